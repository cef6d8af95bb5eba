"""qattune.generation: KV-cache decoding of batched prompts and the sampling rules it uses."""

from .decode import GenerationOutput
from .decode import GenerationStats
from .decode import generate
from .decode import model_dtype_and_device
from .sampling import next_token_probs
from .sampling import sample_next_token
from .sampling import top_k_filter
from .sampling import top_p_filter
from .text import TextGeneration
from .text import check_tokenizer_fits
from .text import encode_prompt
from .text import generate_text

__all__ = [
    "GenerationOutput",
    "GenerationStats",
    "TextGeneration",
    "check_tokenizer_fits",
    "encode_prompt",
    "generate",
    "generate_text",
    "model_dtype_and_device",
    "next_token_probs",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]
