"""Build a model from a checkpoint: structure on the meta device, then the checkpoint's tensors assigned.

No weight is allocated twice: the model is built on `meta` (no memory), each loaded tensor is moved to
its device and dtype one at a time, and `load_state_dict(assign=True)` makes the tensors the parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from qattune.checkpoint.base import Checkpointer, expected_shapes
from qattune.errors import QattuneError
from qattune.models.transformer import Transformer, TransformerConfig


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _builder_name(builder: Callable[..., nn.Module]) -> str:
    return f"{getattr(builder, '__module__', '')}.{getattr(builder, '__qualname__', repr(builder))}".lstrip(".")


def check_model_matches(
    model: nn.Module, checkpoint_shapes: Mapping[str, tuple[int, ...]], model_name: str, source: str
) -> None:
    """Raise a one-line QattuneError naming the first tensor whose shape differs (or is absent)."""
    model_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, want in model_shapes.items():
        have = checkpoint_shapes.get(name)
        if have is None:
            if name == "output.weight" and "tok_embeddings.weight" in checkpoint_shapes:
                continue  # a tied checkpoint loads into a tied model; checked below when untied
            raise QattuneError(f"model {model_name} has tensor '{name}' that checkpoint {source} lacks")
        if have != want:
            raise QattuneError(
                f"model {model_name} does not match checkpoint {source}: tensor '{name}' is {_shape(want)} in the "
                f"model but {_shape(have)} in the checkpoint; use the builder for this checkpoint's size"
            )
    extra = [name for name in checkpoint_shapes if name not in model_shapes]
    if extra:
        raise QattuneError(
            f"checkpoint {source} has tensor '{extra[0]}' that model {model_name} lacks; use the matching builder"
        )
    if isinstance(model, Transformer) and model.weights_tied() != ("output.weight" not in checkpoint_shapes):
        tied = "ties the output head to the embedding" if model.weights_tied() else "has a separate output head"
        raise QattuneError(
            f"model {model_name} {tied} but checkpoint {source} does not; use the builder for this checkpoint"
        )


# Fields that change the numbers without changing any shape; compared with a relative tolerance.
_NUMERIC_FIELDS = ("norm_eps", "rope_base", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_seq_len")  # fmt: skip


def check_config_matches(model: nn.Module, config: TransformerConfig, model_name: str, source: str) -> None:
    """Raise if the model's norm epsilon or RoPE settings differ from the checkpoint's config."""
    if not isinstance(model, Transformer):
        return
    for field in _NUMERIC_FIELDS:
        ours, theirs = getattr(model.config, field), getattr(config, field)
        same = ours == theirs or (
            ours is not None and theirs is not None and math.isclose(ours, theirs, rel_tol=1e-5)
        )
        if not same:
            raise QattuneError(
                f"model {model_name} has {field}={ours} but checkpoint {source} says {theirs}; "
                "use the builder for this checkpoint"
            )


def load_into(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    device: Union[torch.device, str, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load `state_dict` (consumed) into `model`, moving tensors to `device`/`dtype` one at a time.

    A model on the meta device gets the tensors assigned as its parameters; a materialised one copies them.
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if device is None:
        device = "cpu" if on_meta else next(model.parameters()).device
    for name in list(state_dict):
        tensor = state_dict[name]
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        state_dict[name] = tensor.to(device=device, dtype=target_dtype)
    tied = isinstance(model, Transformer) and model.weights_tied()
    if tied and "output.weight" in state_dict:
        state_dict.pop("output.weight")
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    return model


def build_model_from_checkpoint(
    checkpointer: Checkpointer,
    builder: Optional[Callable[[], nn.Module]] = None,
    *,
    device: Union[torch.device, str, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model a checkpoint holds, with its weights, on `device` (default cpu) in `dtype` (default: stored).

    `builder` (e.g. `qattune.models.llama3_2_1b`) is checked against the checkpoint's sizes before any
    tensor is read; without one the model is built from the checkpoint's own config.
    """
    config = checkpointer.config
    with torch.device("meta"):
        model = builder() if builder is not None else Transformer(config)
    name = _builder_name(builder) if builder is not None else "built from the checkpoint's config"
    shapes = expected_shapes(config)
    if config.tie_embeddings:
        shapes.pop("output.weight", None)
    check_model_matches(model, shapes, name, checkpointer.describe())
    check_config_matches(model, config, name, checkpointer.describe())
    state_dict, _ = checkpointer.load()
    return load_into(model, state_dict, device=device, dtype=dtype)
