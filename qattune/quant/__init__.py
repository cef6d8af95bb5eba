"""qattune.quant: schemes, QAT/PTQ quantizers, fake-quantized and real quantized modules, export."""

from .quantizer import PTQQuantizer
from .quantizer import QATQuantizer
from .quantizer import set_fake_quant
from .report import QuantReport
from .schemes import SCHEMES
from .schemes import SchemeConfig
from .schemes import get_scheme

__all__ = ["PTQQuantizer", "QATQuantizer", "QuantReport", "SCHEMES", "SchemeConfig", "get_scheme", "set_fake_quant"]
