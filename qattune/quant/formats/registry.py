"""Look numeric formats up by name."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

from qattune.errors import QattuneError
from qattune.quant.formats.base import NumericFormat
from qattune.quant.formats.float8 import Float8Rowwise
from qattune.quant.formats.gguf_blocks import GGUFQ4_0, GGUFQ8_0
from qattune.quant.formats.int4_tinygemm import Int4Tinygemm
from qattune.quant.formats.int_affine import IntAffine
from qattune.quant.formats.mx import MXFormat
from qattune.quant.formats.nf4 import NF4
from qattune.quant.formats.nvfp4 import NVFP4

FORMATS: dict[str, Callable[..., NumericFormat]] = {
    "int": IntAffine,
    "int4_tinygemm": Int4Tinygemm,
    "float8_rowwise": Float8Rowwise,
    "mx": MXFormat,
    "mxfp8": functools.partial(MXFormat, element="fp8_e4m3"),
    "mxfp4": functools.partial(MXFormat, element="fp4_e2m1"),
    "nvfp4": NVFP4,
    "q8_0": GGUFQ8_0,
    "q4_0": GGUFQ4_0,
    "nf4": NF4,
}


def get_format(name: str, **options: Any) -> NumericFormat:
    """Build the numeric format `name` (one of FORMATS) with its constructor `options`."""
    factory = FORMATS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise QattuneError(f"unknown numeric format {name!r}{hint} Known formats: {', '.join(FORMATS)}")
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as err:
        accepted = ", ".join(p for p in signature.parameters if p != "self") or "no options"
        raise QattuneError(f"numeric format {name!r}: {err}; it accepts: {accepted}") from None
    return factory(**options)
