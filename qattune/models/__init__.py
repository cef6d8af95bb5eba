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
]
