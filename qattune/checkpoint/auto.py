"""Load whatever a user points at: a float checkpoint or a quantized one, by looking at the files.

- a folder with `quantization_config.json`: qattune's quantized output (the `quantize` recipe);
- a folder with `config.json`: a Hugging Face checkpoint (also a training `step_N`);
- a folder with `params.json`: a Meta checkpoint;
- a `.gguf` file: dequantized into a float model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from qattune.errors import QattuneError


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


def load_model(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, keep_dequantized: bool = False) -> nn.Module:
    """The model stored at `path`, float or quantized, on `device` in eval mode.

    `keep_dequantized`: quantized layers that no kernel serves dequantize their weight once and keep it
    (same numerics, float-weight memory; much faster decoding on CPU).
    `dtype` applies to float checkpoints; a quantized model keeps the dtypes it was saved with (its scales'
    dtypes are part of the scheme's numerics).
    """
    from qattune.checkpoint import HFCheckpointer, build_model_from_checkpoint
    from qattune.models import Transformer

    path = Path(path).expanduser()
    if not path.exists():
        raise QattuneError(f"checkpoint not found: {path}")
    if is_quantized_checkpoint(path):
        from qattune.quant import load_quantized

        config = HFCheckpointer(str(path)).config
        with torch.device("meta"):
            model = Transformer(config)
        model = load_quantized(model, path, device=device)  # stored dtypes kept: scales are part of the scheme
        for module in model.modules():
            if hasattr(module, "keep_dequantized"):
                module.keep_dequantized = keep_dequantized
    else:
        model = build_model_from_checkpoint(_float_checkpointer(path), device=device, dtype=dtype)
    return model.eval()
