"""qattune.models: one decoder-only Transformer, per-family builders, and state-dict adapters."""

from qattune.models.adapters import MODEL_TYPES, StateDictAdapter, get_adapter
from qattune.models.builders import llama
from qattune.models.builders import llama2_7b
from qattune.models.builders import llama3_8b
from qattune.models.builders import llama3_1_8b
from qattune.models.builders import llama3_2_1b
from qattune.models.builders import llama3_2_3b
from qattune.models.builders import smollm2_135m
from qattune.models.builders import smollm2_360m
from qattune.models.builders import smollm2_1_7b
from qattune.models.builders import qwen2_5_0_5b
from qattune.models.builders import qwen2_5_1_5b
from qattune.models.builders import qwen2_5_3b
from qattune.models.builders import qwen2_5_7b
from qattune.models.builders import qwen2_5_1_5b_base
from qattune.models.builders import qwen2_5_1_5b_instruct
from qattune.models.builders import qwen2_5_7b_base
from qattune.models.builders import qwen2_5_7b_instruct
from qattune.models.builders import qwen2_5_14b_base
from qattune.models.builders import qwen2_5_14b_instruct
from qattune.models.lora import LoRAConfig
from qattune.models.lora import LoRALinear
from qattune.models.lora import apply_lora
from qattune.models.lora import get_lora_config
from qattune.models.lora import load_lora_state_dict
from qattune.models.lora import lora_modules
from qattune.models.lora import lora_state_dict
from qattune.models.lora import merge_lora
from qattune.models.lora import merged_state_dict
from qattune.models.lora import split_lora
from qattune.models.lora_builders import lora_llama
from qattune.models.lora_builders import lora_llama2_7b
from qattune.models.lora_builders import lora_llama3_8b
from qattune.models.lora_builders import lora_llama3_1_8b
from qattune.models.lora_builders import lora_llama3_2_1b
from qattune.models.lora_builders import lora_llama3_2_3b
from qattune.models.lora_builders import lora_smollm2_135m
from qattune.models.lora_builders import lora_smollm2_360m
from qattune.models.lora_builders import lora_smollm2_1_7b
from qattune.models.lora_builders import lora_qwen2_5_0_5b
from qattune.models.lora_builders import lora_qwen2_5_1_5b
from qattune.models.lora_builders import lora_qwen2_5_3b
from qattune.models.lora_builders import lora_qwen2_5_7b
from qattune.models.lora_builders import lora_qwen2_5_1_5b_base
from qattune.models.lora_builders import lora_qwen2_5_1_5b_instruct
from qattune.models.lora_builders import lora_qwen2_5_7b_base
from qattune.models.lora_builders import lora_qwen2_5_7b_instruct
from qattune.models.lora_builders import lora_qwen2_5_14b_base
from qattune.models.lora_builders import lora_qwen2_5_14b_instruct
from qattune.models.transformer import KVCache, RMSNorm, Transformer, TransformerBlock, TransformerConfig

__all__ = [
    "KVCache",
    "MODEL_TYPES",
    "RMSNorm",
    "StateDictAdapter",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "get_adapter",
    "llama",
    "llama2_7b",
    "llama3_8b",
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "smollm2_135m",
    "smollm2_360m",
    "smollm2_1_7b",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "qwen2_5_1_5b_base",
    "qwen2_5_1_5b_instruct",
    "qwen2_5_7b_base",
    "qwen2_5_7b_instruct",
    "qwen2_5_14b_base",
    "qwen2_5_14b_instruct",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "get_lora_config",
    "load_lora_state_dict",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "split_lora",
    "lora_llama",
    "lora_llama2_7b",
    "lora_llama3_8b",
    "lora_llama3_1_8b",
    "lora_llama3_2_1b",
    "lora_llama3_2_3b",
    "lora_smollm2_135m",
    "lora_smollm2_360m",
    "lora_smollm2_1_7b",
    "lora_qwen2_5_0_5b",
    "lora_qwen2_5_1_5b",
    "lora_qwen2_5_3b",
    "lora_qwen2_5_7b",
    "lora_qwen2_5_1_5b_base",
    "lora_qwen2_5_1_5b_instruct",
    "lora_qwen2_5_7b_base",
    "lora_qwen2_5_7b_instruct",
    "lora_qwen2_5_14b_base",
    "lora_qwen2_5_14b_instruct",
]
