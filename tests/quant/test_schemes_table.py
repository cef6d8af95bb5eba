"""The scheme table: every scheme's formats and defaults, and the option checks."""

import pytest
import torch

from qattune.errors import QattuneError
from qattune.quant.schemes import SCHEMES, get_scheme, resolve_scheme_config

# scheme: (Linear weight format, output-head format, embedding format, activation format or None,
#          default group/block size of the Linear weight)
EXPECTED = {
    "8da4w": ("int4_sym", "int4_sym", "int4_sym", "int8_asym", 32),
    "4w": ("int4_tinygemm", "int4_tinygemm", "int4_tinygemm", None, 128),
    "8w": ("int8_sym", "int8_sym", "int8_sym", None, None),
    "8da8w": ("int8_sym", "int8_sym", "int8_sym", "int8_sym", None),
    "fp8": ("float8_rowwise", "float8_rowwise", "float8_rowwise", "float8_rowwise", None),
    "mxfp8": ("mxfp8", "mxfp8", "mxfp8", "mxfp8", 32),
    "mxfp4": ("mxfp4", "mxfp4", "mxfp4", "mxfp4", 32),
    "nvfp4": ("nvfp4", "nvfp4", "nvfp4", "nvfp4", 16),
    "q4_0": ("q4_0", "q8_0", "q8_0", None, 32),  # Q8_0 activations are optional, off by default
    "q8_0": ("q8_0", "q8_0", "q8_0", None, 32),
    "nf4": ("nf4", "nf4", "nf4", None, 64),
}


def test_table_has_exactly_the_design_schemes():
    assert set(SCHEMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scheme_formats(name):
    weight, head, embedding, activation, block = EXPECTED[name]
    config = resolve_scheme_config(name)
    assert config.weight_format("Linear", is_output=False).name == weight
    assert config.weight_format("Linear", is_output=True).name == head
    assert config.weight_format("Embedding", is_output=False).name == embedding
    act = config.activation_format()
    assert (act.name if act is not None else None) == activation
    assert config.weight_format("Linear", is_output=False).block_size == block


def test_8da4w_activation_is_per_token_asymmetric_int8():
    act = resolve_scheme_config("8da4w").activation_format()
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 4.0, 8.0]])
    q = act.quantize(x)
    # torchao: scale = (max(x, 0) - min(x, 0)) / 255 per row
    torch.testing.assert_close(q.scale.flatten(), torch.tensor([3.0 / 255, 12.0 / 255]))


def test_group_size_option():
    assert resolve_scheme_config("8da4w", group_size=64).weight_format("Linear", False).block_size == 64
    assert resolve_scheme_config("4w", group_size=32).weight_format("Linear", False).block_size == 32
    assert resolve_scheme_config("nf4", group_size=128).weight_format("Linear", False).block_size == 128


def test_group_size_refused_for_fixed_block_schemes():
    with pytest.raises(QattuneError, match=r"group_size=64: scheme 'mxfp4' has a fixed block layout"):
        resolve_scheme_config("mxfp4", group_size=64)
    with pytest.raises(QattuneError, match="must be a positive integer"):
        resolve_scheme_config("8da4w", group_size=0)


def test_activation_option():
    assert resolve_scheme_config("q4_0", quantize_activations=True).activation_format().name == "q8_0"
    assert resolve_scheme_config("fp8", quantize_activations=False).activation_format() is None
    with pytest.raises(QattuneError, match="scheme '4w' is weight-only"):
        resolve_scheme_config("4w", quantize_activations=True)
    with pytest.raises(QattuneError, match="scheme '8da4w' always quantizes activations"):
        resolve_scheme_config("8da4w", quantize_activations=False)


def test_embedding_and_output_defaults():
    gguf = resolve_scheme_config("q4_0")
    assert gguf.quantize_embedding and gguf.quantize_output
    int4 = resolve_scheme_config("8da4w")
    assert not int4.quantize_embedding and int4.quantize_output
    nf4 = resolve_scheme_config("nf4", quantize_embedding=True)
    assert nf4.quantize_embedding and not nf4.quantize_output


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(QattuneError, match=r"unknown quantization scheme '8da3w'; choose one of: 8da4w, 4w"):
        get_scheme("8da3w")


def test_config_round_trips_through_dict():
    config = resolve_scheme_config("8da4w", group_size=64, exclude=["output"], include=["layers"])
    assert type(config).from_dict(config.to_dict()) == config


def test_quantizer_signatures_list_every_scheme_for_static_config_validation():
    import typing

    from qattune.quant import PTQQuantizer, QATQuantizer

    for quantizer in (QATQuantizer, PTQQuantizer):
        annotation = typing.get_type_hints(quantizer.__init__)["scheme"]
        assert list(typing.get_args(annotation)) == list(SCHEMES)
