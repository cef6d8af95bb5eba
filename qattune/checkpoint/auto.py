"""Load whatever a user points at: a float checkpoint or a quantized one, by looking at the files.

- a folder with `quantization_config.json`: qattune's quantized output (the `quantize` recipe);
- a folder with `config.json`: a Hugging Face checkpoint (also a training `step_N`);
- a folder with `params.json`: a Meta checkpoint;
- a `.gguf` file: dequantized into a float model.

`checkpoint_config(path)` reads only configs and file headers, so recipes check every checkpoint (and
the tokenizer against its vocabulary) before loading any weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.models.transformer import TransformerConfig


def is_quantized_checkpoint(path: Union[str, Path]) -> bool:
    from qattune.quant.serialization import CONFIG_FILE

    return Path(path, CONFIG_FILE).is_file()


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


def checkpoint_config(path: Union[str, Path]) -> TransformerConfig:
    """The model config of the checkpoint at `path`, after checking that it looks loadable: its config
    files parse and its safetensors headers open. No tensor data is read."""
    from qattune.checkpoint import HFCheckpointer

    path = _existing(path)
    if is_quantized_checkpoint(path):
        from qattune.quant.serialization import check_quantized_checkpoint

        check_quantized_checkpoint(path)
        return HFCheckpointer(str(path)).config
    checkpointer = _float_checkpointer(path)
    for file in getattr(checkpointer, "weight_files", list)():
        _check_safetensors_header(file)
    return checkpointer.config


def load_model(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, keep_dequantized: bool = False) -> nn.Module:
    """The model stored at `path`, float or quantized, on `device` in eval mode.

    `dtype`: the compute dtype (default: as stored). A float checkpoint's tensors are cast to it; a
    quantized model casts its float parts (norms, layers kept in float) and dequantizes to it, while its
    packed codes and scales keep their stored dtypes (they are the scheme's numerics).
    `keep_dequantized`: quantized layers that no kernel serves dequantize their weight once and keep it
    (same numerics, float-weight memory; much faster decoding on CPU).
    """
    from qattune.checkpoint import HFCheckpointer, build_model_from_checkpoint
    from qattune.models import Transformer

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
