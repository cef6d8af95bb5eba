"""qattune.checkpoint: read and write Hugging Face, Meta and GGUF checkpoints; build models from them."""

from qattune.checkpoint.atomic import atomic_directory, writable_directory
from qattune.checkpoint.auto import (CheckpointerSource, checkpoint_config, checkpoint_source, is_quantized_checkpoint,
                                     load_model)
from qattune.checkpoint.base import Checkpointer, expected_shapes
from qattune.checkpoint.gguf import GGUFCheckpointer, smollm2_135m_gguf_path
from qattune.checkpoint.gguf_export import check_gguf_scheme, export_gguf, gguf_tensor_sources, gguf_tokenizer_metadata
from qattune.checkpoint.hf import HFCheckpointer, write_hf_checkpoint
from qattune.checkpoint.loading import build_model_from_checkpoint, check_model_matches, load_into
from qattune.checkpoint.meta import MetaCheckpointer
from qattune.checkpoint.peft import load_peft_adapter
from qattune.checkpoint.peft import read_peft_config
from qattune.checkpoint.peft import save_peft_adapter
from qattune.checkpoint.peft import write_peft_adapter

__all__ = [
    "Checkpointer",
    "GGUFCheckpointer",
    "HFCheckpointer",
    "MetaCheckpointer",
    "atomic_directory",
    "CheckpointerSource",
    "checkpoint_config",
    "checkpoint_source",
    "writable_directory",
    "build_model_from_checkpoint",
    "check_model_matches",
    "expected_shapes",
    "is_quantized_checkpoint",
    "load_model",
    "load_into",
    "load_peft_adapter",
    "read_peft_config",
    "save_peft_adapter",
    "smollm2_135m_gguf_path",
    "write_hf_checkpoint",
    "write_peft_adapter",
]
