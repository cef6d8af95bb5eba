"""Fake-quantized (QAT) and real quantized (converted) Linear/Embedding modules."""

from .fake_quant import FakeQuantEmbedding
from .fake_quant import FakeQuantLinear
from .quantized import QuantizedEmbedding
from .quantized import QuantizedLinear

__all__ = ["FakeQuantEmbedding", "FakeQuantLinear", "QuantizedEmbedding", "QuantizedLinear"]
