"""qattune.quant: schemes, QAT/PTQ quantizers, fake-quantized and real quantized modules, export."""

from .gguf_export import write_gguf
from .modules import FakeQuantEmbedding
from .modules import FakeQuantLinear
from .modules import QuantizedEmbedding
from .modules import QuantizedLinear
from .quantizer import PTQQuantizer
from .quantizer import QATQuantizer
from .quantizer import set_fake_quant
from .report import QuantReport
from .schemes import SCHEMES
from .schemes import SchemeConfig
from .schemes import get_scheme
from .serialization import load_quantized
from .serialization import read_quantization_config
from .serialization import save_quantized

__all__ = [
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "PTQQuantizer",
    "QATQuantizer",
    "QuantReport",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "SCHEMES",
    "SchemeConfig",
    "get_scheme",
    "load_quantized",
    "read_quantization_config",
    "save_quantized",
    "set_fake_quant",
    "write_gguf",
]
