"""LoRA: low-rank adapters on a frozen base, which may be float, fake-quantized (QAT) or truly quantized (QLoRA).

`LoRALinear` wraps any linear-like module (`in_features`, `out_features`, a forward): a plain nn.Linear,
the quantizer's FakeQuantLinear, or a converted QuantizedLinear (e.g. `nf4`):

    out = base(x) + (dropout(x) @ A^T @ B^T) * (alpha / rank)

A is [rank, in] with Kaiming-uniform init, B is [out, rank] of zeros, so a fresh adapter changes nothing.
A and B are plain Parameters (not nn.Linear), so a quantizer never mistakes them for layers to quantize.
The adapter reads the unquantized input; the base applies its own (fake) quantization.

Order of use (what the `qat_lora` recipe does): build the base, load its weights, `quantizer.prepare(base)`
(fake-quantize it) or convert it for real (QLoRA), then `apply_lora(base, ...)`. Not the other way round:
after apply_lora the bases sit under `<layer>.base`, where the quantizer's name filters (its output-head
pattern, include/exclude) no longer match. The LoRA builders return a model with adapters applied;
`split_lora` takes them off again and returns the settings, so a recipe can load and quantize the base
first. `merge_lora` / `merged_state_dict` give a plain float model with the state-dict names of a model
without LoRA (base + scaled B @ A folded into each weight; quantized bases dequantized, fake-quantized
ones back to float), ready for the Hugging Face checkpointer and `quantize`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError

# torchtune's names for the attention projections -> where they live in qattune's Transformer.
ATTN_MODULES = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "output_proj": "attn.o_proj"}
MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OUTPUT_MODULE = "output"
_MLP_HINT = "MLP projections are chosen with apply_lora_to_mlp: true"
_OUTPUT_HINT = "the output head is chosen with apply_lora_to_output: true"
_NAME_HINTS = {"o_proj": "Hugging Face's name; torchtune's and qattune's is output_proj",
               "gate_proj": _MLP_HINT, "up_proj": _MLP_HINT, "down_proj": _MLP_HINT,
               "w1": _MLP_HINT, "w2": _MLP_HINT, "w3": _MLP_HINT,
               "output": _OUTPUT_HINT, "lm_head": _OUTPUT_HINT}  # fmt: skip
_CONFIG_ATTR = "qattune_lora_config"  # set on a model by apply_lora


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their rank, alpha and dropout (torchtune's field names)."""

    lora_attn_modules: list[str] = field(default_factory=list)
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_attn_modules", list(self.lora_attn_modules))
        for name in self.lora_attn_modules:
            if name not in ATTN_MODULES:
                hint = f" ({_NAME_HINTS[name]})" if name in _NAME_HINTS else ""
                raise QattuneError(
                    f"lora_attn_modules: unknown module '{name}'{hint}; valid names: {', '.join(ATTN_MODULES)}"
                )
        if len(set(self.lora_attn_modules)) != len(self.lora_attn_modules):
            raise QattuneError(f"lora_attn_modules: {self.lora_attn_modules} names a module twice; list each once")
        if not self.lora_attn_modules and not self.apply_lora_to_mlp and not self.apply_lora_to_output:
            raise QattuneError(
                "LoRA would adapt nothing: lora_attn_modules is empty and apply_lora_to_mlp and "
                "apply_lora_to_output are false; list e.g. lora_attn_modules: [q_proj, v_proj]"
            )
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise QattuneError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise QattuneError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise QattuneError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    def target_suffixes(self) -> tuple[str, ...]:
        """Module-name suffixes (qattune names) of the layers this config adapts."""
        suffixes = [ATTN_MODULES[name] for name in self.lora_attn_modules]
        if self.apply_lora_to_mlp:
            suffixes.extend(MLP_MODULES)
        if self.apply_lora_to_output:
            suffixes.append(OUTPUT_MODULE)
        return tuple(suffixes)

    def to_dict(self) -> dict[str, Any]:
        """The keyword arguments of `apply_lora`."""
        return asdict(self)


def _first_float_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor is not None and tensor.is_floating_point():
            return tensor
    return None


class LoRALinear(nn.Module):
    """A frozen linear-like `base` plus a trainable low-rank update scaled by `alpha / rank`."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        try:
            self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        except AttributeError:
            raise QattuneError(
                f"LoRA needs a linear layer with in_features/out_features; got {type(base).__name__}"
            ) from None
        reference = _first_float_tensor(base)
        device = reference.device if reference is not None else None
        dtype = dtype or (reference.dtype if reference is not None else torch.get_default_dtype())
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (as nn.Linear initialises weights); B: zeros, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        low_rank = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return out + (low_rank * self.scale).to(out.dtype)

    # --- merging ---------------------------------------------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        """The base's float weight: dequantized for a quantized base, the float master weight otherwise."""
        if hasattr(self.base, "dequantized_weight"):
            return self.base.dequantized_weight(torch.float32)
        return self.base.weight

    def _default_merged_dtype(self) -> torch.dtype:
        weight = getattr(self.base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return self.lora_a.dtype

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """base weight + (alpha / rank) * B @ A, summed in float32, in `dtype` (default: the base's)."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        return (self._base_weight().float() + delta).to(dtype or self._default_merged_dtype())

    @torch.no_grad()
    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain nn.Linear computing base + adapter in one weight (the base's bias kept)."""
        weight = self.merged_weight(dtype)
        bias = getattr(self.base, "bias", None)
        return _linear(weight, None if bias is None else bias.detach().to(weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = nn.Parameter(weight)
    linear.bias = None if bias is None else nn.Parameter(bias)
    return linear


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _model_float_dtype(model: nn.Module) -> torch.dtype:
    reference = _first_float_tensor(model)
    return reference.dtype if reference is not None else torch.get_default_dtype()


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _output_is_tied(model: nn.Module) -> bool:
    weights_tied = getattr(model, "weights_tied", None)
    return bool(weights_tied()) if callable(weights_tied) else False


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, module) of every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(
    model: nn.Module,
    *,
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Wrap the chosen projections in LoRALinear (in place) and freeze every other parameter.

    Works on a float model and on one whose layers the quantizer already swapped (FakeQuantLinear,
    QuantizedLinear). Adapters take the model's float dtype and each layer's device.
    lora_attn_modules: torchtune names, any of q_proj, k_proj, v_proj, output_proj.
    apply_lora_to_mlp: adapt gate_proj, up_proj and down_proj. apply_lora_to_output: adapt the output head
    (refused when it is tied to the token embedding).
    """
    config = LoRAConfig(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout)
    if any(True for _ in lora_modules(model)):
        raise QattuneError("apply_lora: the model already has LoRA adapters; apply LoRA once (or split_lora first)")
    if config.apply_lora_to_output and _output_is_tied(model):
        raise QattuneError(
            "apply_lora_to_output=true, but this model's output head is tied to the token embedding; "
            "set apply_lora_to_output: false"
        )
    dtype = _model_float_dtype(model)
    model.requires_grad_(False)
    for suffix in config.target_suffixes():
        names = [name for name, _ in model.named_modules() if _matches(name, suffix)]
        if not names:
            raise QattuneError(
                f"apply_lora: the model ({type(model).__name__}) has no module named '{suffix}' "
                "(qattune Transformer layout expected)"
            )
        for name in names:
            base = model.get_submodule(name)
            _set_submodule(model, name, LoRALinear(base, lora_rank, lora_alpha, lora_dropout, dtype=dtype))
    setattr(model, _CONFIG_ATTR, config)
    return model


def get_lora_config(model: nn.Module) -> LoRAConfig:
    """The settings `apply_lora` used on `model`."""
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise QattuneError(f"model {type(model).__name__} has no LoRA adapters; build it with a lora_* builder")
    return config


def split_lora(model: nn.Module) -> tuple[nn.Module, LoRAConfig]:
    """Take the adapters off (discarding them) and return (base model, settings), all parameters trainable.

    For recipes: build with a `lora_*` builder, split, load and quantize the base, then
    `apply_lora(base, **config.to_dict())`.
    """
    config = get_lora_config(model)
    for name, module in list(lora_modules(model)):
        _set_submodule(model, name, module.base)
    delattr(model, _CONFIG_ATTR)
    model.requires_grad_(True)
    return model, config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only: `<layer>.lora_a` [rank, in] and `<layer>.lora_b` [out, rank], detached."""
    out: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        out[f"{name}.lora_a"] = module.lora_a.detach()
        out[f"{name}.lora_b"] = module.lora_b.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy adapter weights (as `lora_state_dict` names them) into `model`; every adapter must be there."""
    expected = lora_state_dict(model)
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise QattuneError(f"{source}: tensor '{unexpected[0]}' matches no LoRA adapter of the model")
    for name, target in expected.items():
        if name not in state_dict:
            raise QattuneError(f"{source}: LoRA tensor '{name}' is missing")
        tensor = state_dict[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise QattuneError(
                f"{source}: LoRA tensor '{name}' has shape {list(tensor.shape)} but the model's is "
                f"{list(target.shape)}; check lora_rank and the model size"
            )
        target.copy_(tensor)


# --- merging into a plain float model ------------------------------------------------------------------


def _as_float_module(module: nn.Module, dtype: torch.dtype) -> Optional[nn.Module]:
    """The plain float equivalent of a LoRA, fake-quantized or quantized layer; None for anything else."""
    if isinstance(module, LoRALinear):
        return module.merged_linear(None if not hasattr(module.base, "dequantized_weight") else dtype)
    to_float = getattr(module, "to_float", None)
    if callable(to_float):  # fake-quantized: shares its float parameters
        return to_float()
    if not hasattr(module, "dequantized_weight"):
        return None
    with torch.no_grad():
        weight = module.dequantized_weight(dtype)
        if hasattr(module, "num_embeddings"):
            return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=module.padding_idx)
        bias = getattr(module, "bias", None)
        return _linear(weight, None if bias is None else bias.detach().clone().to(dtype))


def _float_replacements(model: nn.Module, dtype: Optional[torch.dtype]) -> dict[str, nn.Module]:
    """Qualified name -> float module for every layer to replace (outermost first; nothing nested)."""
    dtype = dtype or _model_float_dtype(model)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name == n or name.startswith(n + ".") for n in out):
            continue
        replacement = _as_float_module(module, dtype)
        if replacement is not None:
            out[name] = replacement
    return out


def merged_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The state dict `merge_lora(model)` would have, without changing `model` (for periodic checkpoints).

    `dtype` is used for weights rebuilt from a quantized base (default: the model's float dtype).
    """
    replacements = _float_replacements(model, dtype)
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in model.state_dict().items():
        owner = next((n for n in replacements if n == "" or key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
        elif owner not in done:
            done.add(owner)
            prefix = f"{owner}." if owner else ""
            out.update({prefix + k: v for k, v in replacements[owner].state_dict().items()})
    return out


def merge_lora(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every adapter into its layer and make the model plain float (in place; returns it).

    LoRA layers become nn.Linear(base weight + (alpha / rank) * B @ A); fake-quantized layers return to
    float; quantized layers are dequantized (to `dtype`, default the model's float dtype). The result has
    the state-dict names of a model without LoRA and every parameter trainable.
    """
    replacements = _float_replacements(model, dtype)
    if "" in replacements:
        return replacements[""]
    for name, module in replacements.items():
        _set_submodule(model, name, module)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    from qattune.quant.quantizer import QUANT_CONFIG_ATTR  # the converted-model marker no longer applies

    if hasattr(model, QUANT_CONFIG_ATTR):
        delattr(model, QUANT_CONFIG_ATTR)
    model.requires_grad_(True)
    return model


__all__ = [
    "ATTN_MODULES",
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
]
