"""Real quantized Linear and Embedding produced by `convert`: packed storage, a forward that dequantizes.

Linear layers run a PyTorch low-precision kernel where one exists for the format on the device at hand
(see `kernels`) and `use_kernels` is on; otherwise they dequantize the weight (bit-exactly the fake-quant
weight) and call `F.linear`. Activation quantization, where the scheme has it, is the same fake
quantization the QAT model ran, so the converted model computes what was trained.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qattune.quant.formats import (
    Float8Rowwise,
    Int4Tinygemm,
    IntAffine,
    NumericFormat,
    QuantizedTensor,
)
from qattune.quant.modules import kernels
from qattune.quant.modules.packed import BUFFER_NAMES, packed_tensors, quantized_tensor


class _PackedWeightModule(nn.Module):
    """Holds a packed quantized weight of logical shape `weight_shape` in the format `weight_format`."""

    weight_format: NumericFormat
    weight_shape: tuple[int, int]

    def _init_packed(self, weight_format: NumericFormat, shape: tuple[int, int], packed: dict[str, Tensor],
                     weight_dtype: torch.dtype) -> None:
        self.weight_format = weight_format
        self.weight_shape = tuple(shape)  # type: ignore[assignment]
        self.weight_dtype = weight_dtype
        for name in BUFFER_NAMES:
            self.register_buffer(name, packed.get(name))

    def quantized_weight(self, rows: Optional[Tensor] = None) -> QuantizedTensor:
        """The weight as the format's QuantizedTensor (only the given `rows` when asked)."""
        def pick(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None or rows is None or t.dim() < 2:
                return t
            return t[rows]

        return quantized_tensor(self.weight_format, pick(self.weight_packed), pick(self.weight_scale),
                                pick(self.weight_zero), self.weight_global_scale)

    keep_dequantized: bool = False
    """Inference speed-up where no kernel serves the format: dequantize once and keep the float weight
    (costs the float weight's memory; the packed weights never change after conversion)."""

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight this module computes with (bit-exactly the fake-quantized weight), in `dtype`
        (default: the dtype of the float weight it was converted from)."""
        dtype = dtype or self.weight_dtype
        if not self.keep_dequantized:
            return self.weight_format.dequantize(self.quantized_weight(), dtype)
        kept = self.__dict__.get("_kept_weight")
        if kept is None or kept.dtype != dtype or kept.device != self.weight_packed.device:
            kept = self.weight_format.dequantize(self.quantized_weight(), dtype)
            self.__dict__["_kept_weight"] = kept
        return kept

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, computed on each access (a read-only view for code that inspects a
        layer's `.weight` shape, dtype or device); the module stores only the packed form."""
        return self.dequantized_weight()


class QuantizedLinear(_PackedWeightModule):
    """A Linear layer with a packed quantized weight and optional activation quantization."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: NumericFormat,
        activation_format: Optional[NumericFormat],
        packed: dict[str, Tensor],
        bias: Optional[Tensor] = None,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_format = activation_format
        self._init_packed(weight_format, (out_features, in_features), packed, weight_dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.use_kernels = True
        self._kernel_weight: Optional[tuple[torch.device, Optional[Tensor]]] = None  # None: not tried yet
        self._kernel_tables: dict[torch.dtype, Tensor] = {}

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Optional[Tensor],
        weight_format: NumericFormat,
        activation_format: Optional[NumericFormat],
        quantized: Optional[QuantizedTensor] = None,
    ) -> "QuantizedLinear":
        """Quantize a float weight (or take its already computed `quantized` form, e.g. learned scales)."""
        with torch.no_grad():
            q = weight_format.quantize(weight.detach()) if quantized is None else quantized
            bias = None if bias is None else bias.detach().clone()
        out_features, in_features = weight.shape
        return cls(in_features, out_features, weight_format, activation_format,
                   packed_tensors(q, weight_format), bias, weight.dtype)

    def with_rows(self, order: Tensor) -> "QuantizedLinear":
        """The same layer with output rows reordered (`order[i]` = old row of new row i), losslessly:
        packed codes, scales and zeros are per row (e.g. llama.cpp's interleaved q/k rotary layout)."""
        if sorted(order.tolist()) != list(range(self.out_features)):
            raise ValueError(f"order must be a permutation of range({self.out_features})")
        packed = {name: (t if t.dim() < 2 else t[order]) for name in BUFFER_NAMES
                  if (t := getattr(self, name)) is not None}
        bias = None if self.bias is None else self.bias.detach()[order]
        return QuantizedLinear(self.in_features, self.out_features, self.weight_format, self.activation_format,
                               packed, bias, self.weight_dtype)

    # -- kernels -------------------------------------------------------------------------------
    def _int4_kernel_operands(self, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
        """The packed int4 weight and scale/zero table in the device kernel's layouts (built once per
        device and dtype: the packed weights never change after conversion), or None (no kernel)."""
        device = self.weight_packed.device
        if self._kernel_weight is None or self._kernel_weight[0] != device:
            # (device, None) remembers a refusal: unpacking the codes again every call cost 10x the matmul
            self._kernel_weight = (device, kernels.int4_pack_for_kernel(self.quantized_weight().codes))
            self._kernel_tables = {}
        if self._kernel_weight[1] is None:
            return None
        table = self._kernel_tables.get(dtype)
        if table is None:
            table = self._kernel_tables[dtype] = kernels.int4_scales_and_zeros(self.weight_scale, self.weight_zero, dtype)
        return self._kernel_weight[1], table

    def _kernel_forward(self, x2d: Tensor) -> Optional[Tensor]:
        """The layer's matmul (without bias) on a low-precision kernel, or None when none applies."""
        fmt, act = self.weight_format, self.activation_format
        if isinstance(fmt, Int4Tinygemm) and act is None:
            dtype = kernels.int4_kernel_dtype(x2d, fmt.block_size)
            operands = None if dtype is None else self._int4_kernel_operands(dtype)
            if operands is None:
                return None
            weight, table = operands
            return kernels.int4_weight_only_mm(x2d, weight, fmt.block_size, table)
        integer_per_row = (
            isinstance(fmt, IntAffine) and isinstance(act, IntAffine) and fmt.bits == act.bits == 8
            and fmt.symmetric and act.symmetric and fmt.block_size is None and act.block_size is None
        )
        if integer_per_row:
            xq = act.quantize(x2d)
            return kernels.int8_mm(xq.codes, xq.scale, self.weight_packed, self.weight_scale, x2d.dtype)
        if isinstance(fmt, Float8Rowwise) and isinstance(act, Float8Rowwise):
            xq = act.quantize(x2d)
            return kernels.fp8_scaled_mm(xq.codes, xq.scale, self.weight_packed, self.weight_scale, x2d.dtype)
        return None

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernels:
            out = self._kernel_forward(x.reshape(-1, self.in_features))
            if out is not None:
                out = out.reshape(*x.shape[:-1], self.out_features)
                return out if self.bias is None else out + self.bias.to(out.dtype)
        if self.activation_format is not None:
            x = self.activation_format.fake_quantize(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        act = self.activation_format.name if self.activation_format is not None else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight_format.name}, activation={act}")


class QuantizedEmbedding(_PackedWeightModule):
    """An Embedding whose table is packed; a lookup dequantizes only the rows it reads (scales are per
    row block, plus at most one tensor-wide scale, so a row dequantizes on its own)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        weight_format: NumericFormat,
        packed: dict[str, Tensor],
        padding_idx: Optional[int] = None,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_packed(weight_format, (num_embeddings, embedding_dim), packed, weight_dtype)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, weight_format: NumericFormat, quantized: Optional[QuantizedTensor] = None
    ) -> "QuantizedEmbedding":
        with torch.no_grad():
            q = weight_format.quantize(embedding.weight.detach()) if quantized is None else quantized
        return cls(embedding.num_embeddings, embedding.embedding_dim, weight_format,
                   packed_tensors(q, weight_format), embedding.padding_idx, embedding.weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight_format.dequantize(self.quantized_weight(ids.reshape(-1)), self.weight_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_format.name}"

