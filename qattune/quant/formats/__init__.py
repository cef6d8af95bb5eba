"""Numeric formats: quantize / dequantize / fake-quantize along the last (reduction) dimension."""

from .base import NumericFormat
from .base import QuantizedTensor
from .float8 import Float8Rowwise
from .gguf_blocks import GGUFQ4_0
from .gguf_blocks import GGUFQ8_0
from .int4_tinygemm import Int4Tinygemm
from .int_affine import IntAffine
from .mx import MXFormat
from .nf4 import NF4
from .nf4 import NF4_LEVELS
from .nvfp4 import NVFP4
from .packing import pack_uint4
from .packing import unpack_uint4
from .registry import FORMATS
from .registry import get_format

__all__ = [
    "FORMATS",
    "Float8Rowwise",
    "GGUFQ4_0",
    "GGUFQ8_0",
    "Int4Tinygemm",
    "IntAffine",
    "MXFormat",
    "NF4",
    "NF4_LEVELS",
    "NVFP4",
    "NumericFormat",
    "QuantizedTensor",
    "get_format",
    "pack_uint4",
    "unpack_uint4",
]
