"""uint4 packing, the format registry, and the shared QuantizedTensor conventions."""

import pytest
import torch

from qattune.errors import QattuneError
from qattune.quant.formats import (
    FORMATS,
    NF4,
    GGUFQ4_0,
    Int4Tinygemm,
    IntAffine,
    MXFormat,
    NumericFormat,
    get_format,
    pack_uint4,
    unpack_uint4,
)


def test_pack_uint4_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    packed = pack_uint4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(unpack_uint4(packed), codes)


def test_pack_roundtrip_any_rank():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = pack_uint4(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_uint4(packed), codes)


def test_pack_odd_width_is_an_error():
    with pytest.raises(QattuneError, match="odd last dimension"):
        pack_uint4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize(
    "name,options,cls,block,bits",
    [
        ("int", {"bits": 4, "symmetric": True, "group_size": 32}, IntAffine, 32, 4),
        ("int4_tinygemm", {}, Int4Tinygemm, 128, 4),
        ("mxfp4", {}, MXFormat, 32, 4),
        ("mxfp8", {}, MXFormat, 32, 8),
        ("q4_0", {}, GGUFQ4_0, 32, 4),
        ("nf4", {"block_size": 32}, NF4, 32, 4),
    ],
)
def test_get_format_builds_by_name(name, options, cls, block, bits):
    fmt = get_format(name, **options)
    assert isinstance(fmt, cls) and isinstance(fmt, NumericFormat)
    assert fmt.block_size == block and fmt.bits == bits


def test_every_registered_format_quantizes():
    defaults = {"int": {"bits": 8, "symmetric": True, "group_size": None}, "mx": {"element": "fp8_e4m3"}}
    x = torch.randn(2, 128)
    for name in FORMATS:
        fmt = get_format(name, **defaults.get(name, {}))
        q = fmt.quantize(x)
        assert q.codes.shape == x.shape, name
        assert fmt.dequantize(q).shape == x.shape, name


def test_unknown_format_suggests_the_closest_name():
    with pytest.raises(QattuneError, match=r"unknown numeric format 'q4_1'; did you mean 'q4_0'\?"):
        get_format("q4_1")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(QattuneError, match=r"numeric format 'nf4'.*block_sise.*accepts: block_size"):
        get_format("nf4", block_sise=64)
