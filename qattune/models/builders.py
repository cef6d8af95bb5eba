"""Model builders, usable as `_component_` in configs: the generic `llama(...)` and the published sizes.

Every builder returns a `Transformer` with default (random) initialisation on the current default device;
build under `with torch.device("meta"):` to get the structure instantly without allocating, then
`to_empty()` and load a checkpoint (see `qattune.checkpoint.build_model_from_checkpoint`).
The sizes are those of each model's published `config.json`.
"""

from __future__ import annotations

from typing import Optional

from qattune.models.transformer import Transformer, TransformerConfig


def llama(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
    rope_scaling_factor: Optional[float] = None,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_original_max_seq_len: int = 8192,
    tie_embeddings: bool = False,
    qkv_bias: bool = False,
) -> Transformer:
    """A Llama-architecture decoder with every dimension given (tiny test models, custom sizes).

    `rope_scaling_factor` turns on Llama 3.1-style RoPE scaling (with the low/high frequency factors and
    the original context length); `qkv_bias` adds biases to q/k/v (Qwen2); `tie_embeddings` shares the
    output head with the token embedding.
    """
    return Transformer(
        TransformerConfig(
            vocab_size=vocab_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            embed_dim=embed_dim,
            intermediate_dim=intermediate_dim,
            max_seq_len=max_seq_len,
            head_dim=head_dim,
            norm_eps=norm_eps,
            rope_base=rope_base,
            rope_scaling_factor=rope_scaling_factor,
            rope_low_freq_factor=rope_low_freq_factor,
            rope_high_freq_factor=rope_high_freq_factor,
            rope_original_max_seq_len=rope_original_max_seq_len,
            tie_embeddings=tie_embeddings,
            qkv_bias=qkv_bias,
        )
    )


# --- Llama 2 / 3 / 3.1 / 3.2 ---------------------------------------------------------------------------


def llama2_7b() -> Transformer:
    """Llama 2 7B: 32 layers, width 4096, 32 heads (no GQA), vocab 32000."""
    return llama(32_000, 32, 32, 32, 4096, 11_008, 4096, norm_eps=1e-5, rope_base=10_000.0)


def llama3_8b() -> Transformer:
    """Llama 3 8B: 32 layers, width 4096, 32 heads / 8 kv heads, vocab 128256, context 8192."""
    return llama(128_256, 32, 32, 8, 4096, 14_336, 8192, norm_eps=1e-5, rope_base=500_000.0)


def llama3_1_8b() -> Transformer:
    """Llama 3.1 8B: Llama 3 8B sizes, 128k context through RoPE scaling (factor 8)."""
    return llama(
        128_256, 32, 32, 8, 4096, 14_336, 131_072, norm_eps=1e-5, rope_base=500_000.0, rope_scaling_factor=8.0
    )


def llama3_2_1b() -> Transformer:
    """Llama 3.2 1B: 16 layers, width 2048, 32 heads / 8 kv heads, RoPE scaling factor 32, tied embeddings."""
    return llama(
        128_256, 16, 32, 8, 2048, 8192, 131_072,
        norm_eps=1e-5, rope_base=500_000.0, rope_scaling_factor=32.0, tie_embeddings=True,
    )  # fmt: skip


def llama3_2_3b() -> Transformer:
    """Llama 3.2 3B: 28 layers, width 3072, 24 heads / 8 kv heads, RoPE scaling factor 32, tied embeddings."""
    return llama(
        128_256, 28, 24, 8, 3072, 8192, 131_072,
        norm_eps=1e-5, rope_base=500_000.0, rope_scaling_factor=32.0, tie_embeddings=True,
    )  # fmt: skip


# --- SmolLM2 (Llama architecture, tied embeddings) -----------------------------------------------------


def smollm2_135m() -> Transformer:
    """SmolLM2 135M: 30 layers, width 576, 9 heads / 3 kv heads, vocab 49152."""
    return llama(49_152, 30, 9, 3, 576, 1536, 8192, norm_eps=1e-5, rope_base=100_000.0, tie_embeddings=True)


def smollm2_360m() -> Transformer:
    """SmolLM2 360M: 32 layers, width 960, 15 heads / 5 kv heads, vocab 49152."""
    return llama(49_152, 32, 15, 5, 960, 2560, 8192, norm_eps=1e-5, rope_base=100_000.0, tie_embeddings=True)


def smollm2_1_7b() -> Transformer:
    """SmolLM2 1.7B: 24 layers, width 2048, 32 heads (no GQA), vocab 49152."""
    return llama(49_152, 24, 32, 32, 2048, 8192, 8192, norm_eps=1e-5, rope_base=130_000.0, tie_embeddings=True)


# --- Qwen2.5 (q/k/v biases; tied embeddings up to 3B) --------------------------------------------------
# Base and instruct checkpoints of 1.5B, 7B and 14B differ: the base ones declare a 131072-token context
# (and 14B base norm_eps 1e-5); `qwen2_5_1_5b` and `qwen2_5_7b` are the instruct sizes.


def _qwen2_5(vocab: int, layers: int, heads: int, kv_heads: int, dim: int, hidden: int, tied: bool,
             max_seq_len: int = 32_768, norm_eps: float = 1e-6) -> Transformer:
    return llama(
        vocab, layers, heads, kv_heads, dim, hidden, max_seq_len,
        norm_eps=norm_eps, rope_base=1_000_000.0, tie_embeddings=tied, qkv_bias=True,
    )  # fmt: skip


def qwen2_5_0_5b() -> Transformer:
    """Qwen2.5 0.5B: 24 layers, width 896, 14 heads / 2 kv heads, tied embeddings."""
    return _qwen2_5(151_936, 24, 14, 2, 896, 4864, tied=True)


def qwen2_5_1_5b() -> Transformer:
    """Qwen2.5 1.5B: 28 layers, width 1536, 12 heads / 2 kv heads, tied embeddings."""
    return _qwen2_5(151_936, 28, 12, 2, 1536, 8960, tied=True)


def qwen2_5_3b() -> Transformer:
    """Qwen2.5 3B: 36 layers, width 2048, 16 heads / 2 kv heads, tied embeddings."""
    return _qwen2_5(151_936, 36, 16, 2, 2048, 11_008, tied=True)


def qwen2_5_7b() -> Transformer:
    """Qwen2.5 7B: 28 layers, width 3584, 28 heads / 4 kv heads, separate output head."""
    return _qwen2_5(152_064, 28, 28, 4, 3584, 18_944, tied=False)


def qwen2_5_1_5b_base() -> Transformer:
    """Qwen2.5 1.5B base (Qwen/Qwen2.5-1.5B): the 1.5B sizes with a 131072-token context."""
    return _qwen2_5(151_936, 28, 12, 2, 1536, 8960, tied=True, max_seq_len=131_072)


def qwen2_5_7b_base() -> Transformer:
    """Qwen2.5 7B base (Qwen/Qwen2.5-7B): the 7B sizes with a 131072-token context."""
    return _qwen2_5(152_064, 28, 28, 4, 3584, 18_944, tied=False, max_seq_len=131_072)


def qwen2_5_14b_base() -> Transformer:
    """Qwen2.5 14B base (Qwen/Qwen2.5-14B): 48 layers, width 5120, 40 heads / 8 kv heads, norm_eps 1e-5."""
    return _qwen2_5(152_064, 48, 40, 8, 5120, 13_824, tied=False, max_seq_len=131_072, norm_eps=1e-5)


def qwen2_5_14b_instruct() -> Transformer:
    """Qwen2.5 14B instruct (Qwen/Qwen2.5-14B-Instruct): the 14B sizes, 32768-token context, norm_eps 1e-6."""
    return _qwen2_5(152_064, 48, 40, 8, 5120, 13_824, tied=False)


# torchtune's names for the instruct checkpoints (the same sizes as qattune's qwen2_5_1_5b / qwen2_5_7b)
qwen2_5_1_5b_instruct = qwen2_5_1_5b
qwen2_5_7b_instruct = qwen2_5_7b
