"""PyTorch's low-precision matmul kernels for converted Linear layers, when the device has them.

Each function returns None when its kernel cannot run on these inputs (device, dtype, shape), and the
caller falls back to the dequantize path. Every kernel computes the same product as the dequantize path
up to float accumulation order:
- `int4_weight_only_mm` (`4w`): `torch._weight_int4pack_mm_for_cpu` on CPU, `torch._weight_int4pack_mm`
  on CUDA, both for bf16 activations (the CPU kernel takes fp32/fp16 too, but 30-100x slower than the
  float matmul, so those dequantize), with tinygemm's `(q - 8) * scale + zero` dequantization;
- `int8_mm` (`8da8w`): `torch._int_mm` on int8 activation and weight codes, then both scales;
- `fp8_scaled_mm` (`fp8`): `torch._scaled_mm` with row-wise scales (on CUDA for bf16 outputs only).
Other devices (MPS) have none of them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_CUDA_INT4_INNER_K_TILES = 8
_CPU_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: N divisible by 16, K even


def _has(op_name: str) -> bool:
    return hasattr(torch, op_name)


def int4_pack_for_kernel(codes: Tensor) -> Optional[Tensor]:
    """uint8 codes 0..15 `[N, K]` in the layout of the device's int4 mm kernel (None: no kernel for this
    device or shape, e.g. a 260-token output head on CPU)."""
    n, k = codes.shape
    if codes.device.type == "cpu" and _has("_convert_weight_to_int4pack_for_cpu"):
        if n % _CPU_INT4_N_MULTIPLE or k % 2:
            return None
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    if codes.device.type == "cuda" and k % (_CUDA_INT4_INNER_K_TILES * 16) == 0 and n % 8 == 0:
        high_first = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(high_first, _CUDA_INT4_INNER_K_TILES)
    return None


def int4_kernel_dtype(x2d: Tensor, group_size: int) -> Optional[torch.dtype]:
    """The compute dtype the device's int4 kernel takes for these activations, or None (no kernel)."""
    if group_size not in (32, 64, 128, 256) or x2d.shape[-1] % group_size:
        return None
    return torch.bfloat16 if x2d.dtype == torch.bfloat16 else None


def int4_scales_and_zeros(scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """tinygemm's `[K / group_size, N, 2]` scale/zero table from `[N, K / group_size]` scale and zero."""
    return torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()


def int4_weight_only_mm(x2d: Tensor, kernel_weight: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """`x2d @ dequant(W).T` for tinygemm int4; `x2d` in `int4_kernel_dtype` (checked by the caller)."""
    op = torch._weight_int4pack_mm_for_cpu if x2d.device.type == "cpu" else torch._weight_int4pack_mm
    return op(x2d.contiguous(), kernel_weight, group_size, scales_and_zeros)


def int8_mm(
    x_codes: Tensor, x_scale: Tensor, w_codes: Tensor, w_scale: Tensor, out_dtype: torch.dtype
) -> Optional[Tensor]:
    """`(x_codes * x_scale) @ (w_codes * w_scale).T` with an int32-accumulating int8 GEMM."""
    m, k = x_codes.shape
    n = w_codes.shape[0]
    if x_codes.device.type not in ("cpu", "cuda") or (x_codes.device.type == "cuda" and (m <= 16 or k % 8 or n % 8)):
        return None  # (torch has no _int_mm for MPS)
    acc = torch._int_mm(x_codes.contiguous(), w_codes.t())
    return (acc.float() * x_scale.float() * w_scale.float().t()).to(out_dtype)


def fp8_scaled_mm(
    x_codes: Tensor, x_scale: Tensor, w_codes: Tensor, w_scale: Tensor, out_dtype: torch.dtype
) -> Optional[Tensor]:
    """`(x_codes * x_scale) @ (w_codes * w_scale).T` with row-wise scaled FP8 GEMM."""
    m, k = x_codes.shape
    n = w_codes.shape[0]
    if x_codes.device.type == "cuda":
        # with row-wise scales the CUDA kernel writes bf16 only: other outputs would be rounded to it
        if torch.cuda.get_device_capability(x_codes.device) < (8, 9) or k % 16 or n % 16 or out_dtype != torch.bfloat16:
            return None
        out_dtype_kernel = torch.bfloat16
    elif x_codes.device.type == "cpu":
        out_dtype_kernel = torch.float32
    else:  # (torch has no _scaled_mm for MPS)
        return None
    out = torch._scaled_mm(
        x_codes.contiguous(), w_codes.t(), scale_a=x_scale.float().reshape(m, 1).contiguous(),
        scale_b=w_scale.float().reshape(1, n).contiguous(), out_dtype=out_dtype_kernel,
    )
    return out.to(out_dtype)
