"""Load whatever a user points at: a float checkpoint or a quantized one, by looking at the files.

- a folder with `quantization_config.json`: qattune's quantized output (the `quantize` recipe);
- a folder with `config.json`: a Hugging Face checkpoint (also a training `step_N`);
- a folder with `params.json`: a Meta checkpoint;
- a `.gguf` file: dequantized into a float model.

Or a float checkpoint through a configured checkpointer and model builder (torchtune's `model` +
`checkpointer` pair): a `CheckpointerSource`, which `checkpoint_source` makes from the config nodes.
`checkpoint_config(source)` reads only configs and file headers, so recipes check every checkpoint (and
the tokenizer against its vocabulary) before loading any weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.models.transformer import TransformerConfig


@dataclass(frozen=True)
class CheckpointerSource:
    """A float checkpoint read by `checkpointer` into the model `builder` makes (None: the model the
    checkpoint's own config describes); `checkpoint_config` and `load_model` take one in place of a path."""

    checkpointer: Any
    builder: Optional[Callable[[], nn.Module]] = None

    def __str__(self) -> str:
        return self.checkpointer.describe()


Source = Union[str, Path, CheckpointerSource]


def is_quantized_checkpoint(path: Union[str, Path]) -> bool:
    from qattune.quant.serialization import CONFIG_FILE

    return Path(path, CONFIG_FILE).is_file()


def checkpoint_source(checkpoint_dir: Optional[str], checkpointer: Any = None, model: Any = None) -> Optional[Source]:
    """What a recipe loads: `checkpoint_dir` (any checkpoint, quantized included), or torchtune's `model` +
    `checkpointer` config nodes, built here (a float checkpoint; `model` may be left out). Exactly one of
    the two ways, else one line; None when neither is set."""
    if model is not None and checkpointer is None:
        raise QattuneError("model is the builder a checkpointer loads into (torchtune's model + checkpointer), but "
                           "checkpointer is not set: set checkpointer, or remove model (~model)")
    if checkpointer is None:
        return str(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint_dir is not None:
        raise QattuneError(f"checkpoint_dir={checkpoint_dir} and checkpointer (torchtune's model + checkpointer) both "
                           "name the checkpoint to load; keep one: checkpoint_dir=null, or ~checkpointer ~model")
    from qattune.config import instantiate

    built = instantiate(checkpointer)
    folder = getattr(built, "checkpoint_dir", None)
    if folder is not None and Path(folder).is_dir() and is_quantized_checkpoint(folder):
        raise QattuneError(f"checkpointer.checkpoint_dir={folder} holds a quantized model (quantization_config.json); "
                           f"model + checkpointer read float checkpoints: load it with checkpoint_dir={folder} "
                           "(and ~checkpointer ~model)")
    return CheckpointerSource(built, (lambda: instantiate(model)) if model is not None else None)


def _float_checkpointer(path: Path):
    from qattune.checkpoint import GGUFCheckpointer, HFCheckpointer, MetaCheckpointer

    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpointer(str(path))
    if (path / "config.json").is_file():
        return HFCheckpointer(str(path))
    if (path / "params.json").is_file():
        return MetaCheckpointer(str(path))
    raise QattuneError(
        f"{path} is not a checkpoint qattune can read: expected a .gguf file or a folder with config.json "
        "(Hugging Face / qattune output), params.json (Meta) or quantization_config.json (quantized)"
    )


def _existing(path: Union[str, Path]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise QattuneError(f"checkpoint not found: {path}")
    return path


def _check_safetensors_header(path: Path) -> None:
    """One line if the safetensors file at `path` cannot be opened (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise QattuneError(f"cannot read safetensors file {path}: {str(err).splitlines()[0]}") from None


def _checked_config(checkpointer: Any) -> TransformerConfig:
    """A float checkpointer's model config, after checking that its safetensors headers open."""
    for file in getattr(checkpointer, "weight_files", list)():
        _check_safetensors_header(file)
    return checkpointer.config


def checkpoint_config(path: Source) -> TransformerConfig:
    """The model config of the checkpoint at `path` (or of a `CheckpointerSource`), after checking that it
    looks loadable: its config files parse and its safetensors headers open. No tensor data is read."""
    from qattune.checkpoint import HFCheckpointer

    if isinstance(path, CheckpointerSource):
        return _checked_config(path.checkpointer)
    path = _existing(path)
    if is_quantized_checkpoint(path):
        from qattune.quant.serialization import check_quantized_checkpoint

        check_quantized_checkpoint(path)
        return HFCheckpointer(str(path)).config
    return _checked_config(_float_checkpointer(path))


def load_model(path: Source, *, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, keep_dequantized: bool = False) -> nn.Module:
    """The model stored at `path` (or read through a `CheckpointerSource`), float or quantized, on
    `device` in eval mode.

    `dtype`: the compute dtype (default: as stored). A float checkpoint's tensors are cast to it; a
    quantized model casts its float parts (norms, layers kept in float) and dequantizes to it, while its
    packed codes and scales keep their stored dtypes (they are the scheme's numerics).
    `keep_dequantized`: quantized layers that no kernel serves dequantize their weight once and keep it
    (same numerics, float-weight memory; much faster decoding on CPU).
    """
    from qattune.checkpoint import HFCheckpointer, build_model_from_checkpoint
    from qattune.models import Transformer

    if isinstance(path, CheckpointerSource):
        return build_model_from_checkpoint(path.checkpointer, path.builder, device=device, dtype=dtype).eval()
    path = _existing(path)
    if is_quantized_checkpoint(path):
        from qattune.quant import load_quantized

        config = HFCheckpointer(str(path)).config
        with torch.device("meta"):
            model = Transformer(config)
        model = load_quantized(model, path, device=device, dtype=dtype)
        for module in model.modules():
            if hasattr(module, "keep_dequantized"):
                module.keep_dequantized = keep_dequantized
    else:
        model = build_model_from_checkpoint(_float_checkpointer(path), device=device, dtype=dtype)
    return model.eval()
