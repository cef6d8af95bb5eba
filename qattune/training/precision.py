"""Training precision by name: `fp32`, `bf16` (and their long spellings), checked against the device."""

from __future__ import annotations

import torch

from qattune.errors import QattuneError

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a config's `dtype` key; refuses bf16 on a GPU that lacks it."""
    dtype = _DTYPES.get(str(name).lower())
    if dtype is None:
        raise QattuneError(f"dtype '{name}' is not supported; use one of fp32, bf16, fp16")
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == torch.bfloat16 and not native:  # (emulated bf16 on V100/T4 runs, slowly)
        raise QattuneError(f"dtype bf16 is not supported natively by GPU {torch.cuda.get_device_name(device)}; "
                           "use dtype=fp32")
    return dtype
