"""LoRA model builders, usable as `_component_` with torchtune's names and fields (`lora_llama3_2_1b`, ...).

Each returns the base model of the same name with LoRA applied (see `qattune.models.lora.apply_lora`).
A recipe that must load or quantize the base first calls `split_lora` on the result, then `apply_lora`
again. Every builder takes torchtune's fields:
    lora_attn_modules: any of q_proj, k_proj, v_proj, output_proj.
    apply_lora_to_mlp: adapt gate/up/down projections. apply_lora_to_output: adapt the output head.
    lora_rank, lora_alpha, lora_dropout: rank r, scale alpha / r, dropout on the adapter's input.
    use_dora: accepted for torchtune configs; only False is supported.
    quantize_base: QLoRA, as torchtune's `qlora_*` builders (`lora_*` with quantize_base=True): the frozen
        base must be in NF4 before the model's first forward, converted by the `qat_lora` recipe's
        `base_quantizer` (`qattune.quant.PTQQuantizer` with scheme nf4); a forward with any other base is
        refused.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from torch import nn

from qattune.errors import QattuneError
from qattune.models import builders
from qattune.models.lora import apply_lora
from qattune.models.transformer import Transformer

QLORA_BASE_SCHEME = "nf4"  # torchtune's quantize_base: the frozen base weights in NormalFloat4
QLORA_BASE_QUANTIZER = f"{{_component_: qattune.quant.PTQQuantizer, scheme: {QLORA_BASE_SCHEME}}}"


def _base_scheme(model: nn.Module) -> Optional[str]:
    """The scheme `quantizer.convert` turned the model's base into, if any."""
    from qattune.quant.quantizer import QUANT_CONFIG_ATTR

    return (getattr(model, QUANT_CONFIG_ATTR, None) or {}).get("config", {}).get("scheme")


def _require_nf4_base(model: nn.Module) -> None:
    """Refuse the model's first forward unless its base has been converted to NF4 by then (QLoRA)."""

    def check(module: nn.Module, _args: Any) -> None:
        scheme = _base_scheme(module)
        if scheme != QLORA_BASE_SCHEME:
            found = f"base_quantizer converted it to {scheme}" if scheme else "it was not converted"
            raise QattuneError(
                f"quantize_base=true (torchtune's qlora_* builders) trains LoRA over an NF4 base, but {found}; "
                f"in recipe qat_lora set base_quantizer={QLORA_BASE_QUANTIZER} and no quantizer, or use a "
                "lora_* builder with quantize_base: false"
            )
        handle.remove()

    handle = model.register_forward_pre_hook(check)


def _with_lora(
    build: Callable[[], Transformer],
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    use_dora: bool,
    quantize_base: bool,
) -> Transformer:
    if use_dora:
        raise QattuneError("use_dora=true: DoRA is not supported by qattune; set use_dora: false")
    model = build()
    apply_lora(
        model, lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )  # fmt: skip
    if quantize_base:
        _require_nf4_base(model)
    return model


def lora_llama(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    head_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
    rope_scaling_factor: Optional[float] = None,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_original_max_seq_len: int = 8192,
    tie_embeddings: bool = False,
    qkv_bias: bool = False,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """`qattune.models.llama(...)` (every dimension given, e.g. tiny test models) with LoRA applied."""

    def build() -> Transformer:
        return builders.llama(
            vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim, max_seq_len,
            head_dim=head_dim, norm_eps=norm_eps, rope_base=rope_base, rope_scaling_factor=rope_scaling_factor,
            rope_low_freq_factor=rope_low_freq_factor, rope_high_freq_factor=rope_high_freq_factor,
            rope_original_max_seq_len=rope_original_max_seq_len, tie_embeddings=tie_embeddings, qkv_bias=qkv_bias,
        )  # fmt: skip

    return _with_lora(
        build, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_llama2_7b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Llama 2 7B with LoRA applied (torchtune's default lora_dropout for Llama 2, 0.05)."""
    return _with_lora(
        builders.llama2_7b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_llama3_8b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Llama 3 8B with LoRA applied."""
    return _with_lora(
        builders.llama3_8b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_llama3_1_8b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Llama 3.1 8B with LoRA applied."""
    return _with_lora(
        builders.llama3_1_8b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_llama3_2_1b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Llama 3.2 1B (tied output head: apply_lora_to_output is refused) with LoRA applied."""
    return _with_lora(
        builders.llama3_2_1b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_llama3_2_3b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Llama 3.2 3B (tied output head: apply_lora_to_output is refused) with LoRA applied."""
    return _with_lora(
        builders.llama3_2_3b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_smollm2_135m(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """SmolLM2 135M (tied output head) with LoRA applied."""
    return _with_lora(
        builders.smollm2_135m, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_smollm2_360m(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """SmolLM2 360M (tied output head) with LoRA applied."""
    return _with_lora(
        builders.smollm2_360m, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_smollm2_1_7b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """SmolLM2 1.7B (tied output head) with LoRA applied."""
    return _with_lora(
        builders.smollm2_1_7b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_0_5b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 0.5B (tied output head) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_0_5b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_1_5b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 1.5B (tied output head) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_1_5b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_3b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 3B (tied output head) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_3b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_7b(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 7B with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_7b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_1_5b_base(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 1.5B base (131072-token context) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_1_5b_base, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_1_5b_instruct(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 1.5B instruct (torchtune's name; same model as lora_qwen2_5_1_5b)."""
    return _with_lora(
        builders.qwen2_5_1_5b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_7b_base(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 7B base (131072-token context) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_7b_base, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_7b_instruct(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 7B instruct (torchtune's name; same model as lora_qwen2_5_7b)."""
    return _with_lora(
        builders.qwen2_5_7b, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_14b_base(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 14B base (131072-token context, norm_eps 1e-5) with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_14b_base, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
        lora_dropout, use_dora, quantize_base,
    )


def lora_qwen2_5_14b_instruct(
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> Transformer:
    """Qwen2.5 14B instruct with LoRA applied."""
    return _with_lora(
        builders.qwen2_5_14b_instruct, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
        lora_alpha, lora_dropout, use_dora, quantize_base,
    )


__all__ = [
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
