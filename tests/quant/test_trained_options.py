"""The overrides `quantize` suggests when its quantizer differs from the training run's work as typed."""

import shlex

import pytest
from omegaconf import OmegaConf

from qattune.config import instantiate
from qattune.config.overrides import apply_override
from qattune.quant.trained_options import differing_options, mismatch_message

QUANTIZERS = "torchtune.training.quantization"
TRAINED = {"scheme": "8da4w", "group_size": 32, "quantize_activations": True, "quantize_embedding": False,
           "quantize_output": True, "include": [], "exclude": [], "output_head_pattern": "(^|\\.)(output|lm_head)$"}


def _advice(yaml: str, trained: dict) -> str:
    cfg = OmegaConf.create(yaml)
    ours = instantiate(cfg.quantizer).config.to_dict()
    message = mismatch_message("run/step_8", "qattune_training.json", trained, differing_options(trained, ours),
                               cfg.quantizer)
    assert message.startswith("run/step_8 was trained with scheme '8da4w' with group size 32")
    return message


@pytest.mark.parametrize("yaml, expected", [
    (f"quantizer: {{_component_: {QUANTIZERS}.Int8DynActInt4WeightQuantizer}}", "+quantizer.groupsize=32"),
    (f"quantizer: {{_component_: {QUANTIZERS}.Int8DynActInt4WeightQuantizer, groupsize: 256}}",
     "quantizer.groupsize=32"),
    ("quantizer: {_component_: qattune.quant.PTQQuantizer, scheme: 4w, group_size: 128}",
     "quantizer.scheme=8da4w quantizer.group_size=32"),
    ("quantizer: {_component_: qattune.quant.PTQQuantizer, scheme: 8da4w, quantize_embedding: true}",
     "quantizer.quantize_embedding=false"),
])
def test_the_suggested_overrides_build_the_trained_quantizer(yaml, expected):
    message = _advice(yaml, TRAINED)
    overrides = message.split("quantize with the same options: ")[1]
    assert overrides == expected
    cfg = OmegaConf.create(yaml)
    for text in shlex.split(overrides):
        apply_override(cfg, text)
    ours = instantiate(cfg.quantizer).config.to_dict()
    assert differing_options(TRAINED, ours) == []


def test_a_torchtune_class_of_another_scheme_is_replaced_whole():
    message = _advice(f"quantizer: {{_component_: {QUANTIZERS}.Int4WeightOnlyQuantizer}}", TRAINED)
    assert message.endswith(f"{QUANTIZERS}.Int4WeightOnlyQuantizer always quantizes with another scheme: use "
                            "quantizer='{_component_: qattune.quant.QATQuantizer, scheme: 8da4w, group_size: 32}'")
