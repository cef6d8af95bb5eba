"""The quantization schemes: one table of small config objects, separate from the modules that apply them.

A `QuantScheme` says which numeric format a scheme uses for Linear weights, for activations, for
embeddings and for the output head, and which options a user may change. A `SchemeConfig` is a scheme
plus the user's resolved options; the quantizer and the quantized modules read only the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from qattune.errors import QattuneError
from qattune.quant.filters import DEFAULT_OUTPUT_HEAD_PATTERN
from qattune.quant.formats import (
    NF4,
    NVFP4,
    Float8Rowwise,
    GGUFQ4_0,
    GGUFQ8_0,
    Int4Tinygemm,
    IntAffine,
    MXFormat,
    NumericFormat,
)

FormatFactory = Callable[[Optional[int]], NumericFormat]


def _int4_symmetric(group_size: Optional[int]) -> NumericFormat:
    return IntAffine(bits=4, symmetric=True, group_size=group_size)


def _int8_per_channel(group_size: Optional[int]) -> NumericFormat:
    return IntAffine(bits=8, symmetric=True, group_size=None)


def _int8_asymmetric_per_token(group_size: Optional[int]) -> NumericFormat:
    return IntAffine(bits=8, symmetric=False, group_size=None)


def _int4_tinygemm(group_size: Optional[int]) -> NumericFormat:
    return Int4Tinygemm(group_size=group_size)


def _fp8_rowwise(group_size: Optional[int]) -> NumericFormat:
    return Float8Rowwise()


def _mxfp8(group_size: Optional[int]) -> NumericFormat:
    return MXFormat("fp8_e4m3")


def _mxfp4(group_size: Optional[int]) -> NumericFormat:
    return MXFormat("fp4_e2m1")


def _nvfp4(group_size: Optional[int]) -> NumericFormat:
    return NVFP4()


def _q4_0(group_size: Optional[int]) -> NumericFormat:
    return GGUFQ4_0()


def _q8_0(group_size: Optional[int]) -> NumericFormat:
    return GGUFQ8_0()


def _nf4(group_size: Optional[int]) -> NumericFormat:
    return NF4(block_size=group_size)


@dataclass(frozen=True)
class QuantScheme:
    """One row of the scheme table.

    `weight`, `embedding`, `output` and `activation` build the numeric format of each tensor kind from
    the group size (ignored by per-channel and fixed-block formats). `activation` None: weight-only.
    """

    name: str
    description: str
    weight: FormatFactory
    activation: Optional[FormatFactory] = None
    embedding: Optional[FormatFactory] = None  # None: same as `weight`
    output: Optional[FormatFactory] = None  # None: same as `weight`
    default_group_size: Optional[int] = None  # None: the group size is not an option
    activations_optional: bool = False
    activations_default: bool = True
    quantize_embedding_default: bool = False
    quantize_output_default: bool = True


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("8da4w", "int4 symmetric per-group weights, int8 asymmetric per-token activations "
                    "(torchao Int8DynamicActivationInt4Weight)",
                    weight=_int4_symmetric, activation=_int8_asymmetric_per_token, default_group_size=32),
        QuantScheme("4w", "int4 asymmetric per-group weights with float zero (tinygemm int4 weight-only)",
                    weight=_int4_tinygemm, default_group_size=128),
        QuantScheme("8w", "int8 symmetric per-channel weights", weight=_int8_per_channel),
        QuantScheme("8da8w", "int8 symmetric per-channel weights, int8 symmetric per-token activations",
                    weight=_int8_per_channel, activation=_int8_per_channel),
        QuantScheme("fp8", "float8 e4m3 per-row weights and per-token activations",
                    weight=_fp8_rowwise, activation=_fp8_rowwise, activations_optional=True,
                    quantize_output_default=False),
        QuantScheme("mxfp8", "OCP MX FP8 E4M3, blocks of 32 with E8M0 scales",
                    weight=_mxfp8, activation=_mxfp8, activations_optional=True,
                    quantize_output_default=False),
        QuantScheme("mxfp4", "OCP MX FP4 E2M1, blocks of 32 with E8M0 scales",
                    weight=_mxfp4, activation=_mxfp4, activations_optional=True,
                    quantize_output_default=False),
        QuantScheme("nvfp4", "NVFP4: FP4 E2M1, blocks of 16, FP8 E4M3 block scale, fp32 tensor scale",
                    weight=_nvfp4, activation=_nvfp4, activations_optional=True,
                    quantize_output_default=False),
        QuantScheme("q4_0", "GGUF Q4_0 weights; embeddings and output head Q8_0; optional Q8_0 activations",
                    weight=_q4_0, activation=_q8_0, embedding=_q8_0, output=_q8_0,
                    activations_optional=True, activations_default=False, quantize_embedding_default=True),
        QuantScheme("q8_0", "GGUF Q8_0 weights; optional Q8_0 activations",
                    weight=_q8_0, activation=_q8_0, activations_optional=True, activations_default=False,
                    quantize_embedding_default=True),
        QuantScheme("nf4", "NormalFloat4 weights, absmax blocks (QLoRA base weights)",
                    weight=_nf4, default_group_size=64, quantize_output_default=False),
    )
}


def get_scheme(name: str) -> QuantScheme:
    """The scheme called `name`; a QattuneError listing the valid names otherwise."""
    if name not in SCHEMES:
        raise QattuneError(
            f"unknown quantization scheme {name!r}; choose one of: {', '.join(SCHEMES)}"
        )
    return SCHEMES[name]


@dataclass(frozen=True)
class SchemeConfig:
    """A scheme with the user's options resolved: everything a quantizer needs to decide per layer."""

    scheme: str
    group_size: Optional[int]
    quantize_activations: bool
    quantize_embedding: bool
    quantize_output: bool
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    output_head_pattern: str = DEFAULT_OUTPUT_HEAD_PATTERN
    range_learning: bool = False
    _scheme: QuantScheme = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_scheme", get_scheme(self.scheme))

    def weight_format(self, kind: str, is_output: bool) -> NumericFormat:
        """The weight format of a 'Linear' (output head or not) or an 'Embedding'."""
        s = self._scheme
        if kind == "Embedding":
            factory = s.embedding or s.weight
        elif is_output:
            factory = s.output or s.weight
        else:
            factory = s.weight
        return factory(self.group_size)

    def activation_format(self) -> Optional[NumericFormat]:
        """The activation format of quantized Linear layers, None when activations stay in float."""
        if not self.quantize_activations or self._scheme.activation is None:
            return None
        return self._scheme.activation(self.group_size)

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "quantize_activations": self.quantize_activations,
            "quantize_embedding": self.quantize_embedding,
            "quantize_output": self.quantize_output,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "output_head_pattern": self.output_head_pattern,
            "range_learning": self.range_learning,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SchemeConfig":
        data = dict(data)
        data["include"] = tuple(data.get("include") or ())
        data["exclude"] = tuple(data.get("exclude") or ())
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def resolve_scheme_config(
    scheme: str,
    group_size: Optional[int] = None,
    quantize_activations: Optional[bool] = None,
    quantize_embedding: Optional[bool] = None,
    quantize_output: Optional[bool] = None,
    include: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    output_head_pattern: str = DEFAULT_OUTPUT_HEAD_PATTERN,
    range_learning: bool = False,
) -> SchemeConfig:
    """Check the user's options against the scheme and fill in the scheme's defaults."""
    s = get_scheme(scheme)
    if group_size is not None:
        if s.default_group_size is None:
            raise QattuneError(
                f"quantizer option group_size={group_size}: scheme {scheme!r} has a fixed block layout "
                f"and takes no group size; remove group_size (schemes with one: "
                f"{', '.join(n for n, x in SCHEMES.items() if x.default_group_size)})"
            )
        if group_size <= 0:
            raise QattuneError(f"quantizer option group_size={group_size}: must be a positive integer")
    else:
        group_size = s.default_group_size
    if quantize_activations is None:
        quantize_activations = s.activation is not None and s.activations_default
    elif quantize_activations and s.activation is None:
        raise QattuneError(
            f"quantizer option quantize_activations=true: scheme {scheme!r} is weight-only; "
            "remove the option or pick a scheme with activation quantization"
        )
    elif not quantize_activations and s.activation is not None and not s.activations_optional:
        raise QattuneError(
            f"quantizer option quantize_activations=false: scheme {scheme!r} always quantizes "
            "activations; use a weight-only scheme (4w, 8w) instead"
        )
    return SchemeConfig(
        scheme=scheme,
        group_size=group_size,
        quantize_activations=bool(quantize_activations),
        quantize_embedding=s.quantize_embedding_default if quantize_embedding is None else quantize_embedding,
        quantize_output=s.quantize_output_default if quantize_output is None else quantize_output,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        output_head_pattern=output_head_pattern,
        range_learning=range_learning,
    )
