"""Validation reports every mistake at once, one line each, with the key path and a suggestion."""

from pathlib import Path

from omegaconf import OmegaConf

import pytest

from qattune.config import validate_config
from qattune.config.schema import read_schema, require_schema
from qattune.config.validate import resolution_problems
from qattune.errors import QattuneError

M = "qt_fixture_components"
RECIPE = Path(__file__).parent.parent / "cli" / "fixtures" / "sum_recipe.py"


def _problems(cfg, schema=None):
    return [str(p) for p in validate_config(OmegaConf.create(cfg), schema)]


def test_a_config_with_many_mistakes():
    cfg = {
        "value": 1,
        "output_dir": "/tmp/x",
        "seeed": 3,
        "point": {"_component_": f"{M}.Point", "xx": 1},
        "settings": {"_component_": f"{M}.Settings", "name": "n", "mode": "slow", "scale": "big"},
        "nested": {"inner": {"_component_": f"{M}.Pointt", "x": 1}},
        "optimiser": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "betas": "0.9"},
        "log_dir": "${output_dirr}/logs",
        "missing_value": "???",
    }
    problems = _problems(cfg, read_schema(RECIPE))
    assert problems == [
        "log_dir: cannot resolve its value: Interpolation key 'output_dirr' not found",
        "missing_value: a value is required (the config has ???); set it with missing_value=...",
        "seeed: unknown key for recipe 'sum_recipe'. Did you mean 'seed'?",
        "point: unknown key for recipe 'sum_recipe'. Did you mean 'points'?",
        "settings: unknown key for recipe 'sum_recipe'.",
        "nested: unknown key for recipe 'sum_recipe'. Did you mean 'seed'?",
        "optimiser: unknown key for recipe 'sum_recipe'. Did you mean 'optimizer'?",
        "log_dir: unknown key for recipe 'sum_recipe'.",
        "missing_value: unknown key for recipe 'sum_recipe'.",
        f"point.xx: {M}.Point takes no argument 'xx'. Did you mean 'x'?",
        f"point.x: missing required argument of {M}.Point; set point.x=...",
        "settings.mode: expected one of 'fast', 'exact', got 'slow'",
        "settings.scale: expected a number, got 'big'",
        f"nested.inner._component_: unknown component '{M}.Pointt'. Did you mean '{M}.Point' or '{M}.Point3'?",
        "optimiser.betas: expected a list, got '0.9'",
        "optimiser.params: missing required argument of torch.optim.AdamW; set optimiser.params=...",
    ]


def test_recipe_schema_types_required_keys_and_provided_arguments():
    schema = read_schema(RECIPE)
    assert set(schema.fields) == {"output_dir", "value", "seed", "points", "optimizer", "offload", "reduce_op"}
    problems = _problems({"value": "one", "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1},
                          "points": 3}, schema)
    assert problems == [
        "value: expected an int, got 'one'",
        "points: expected a list of a component (a mapping with _component_), got 3",
        "output_dir: missing: recipe 'sum_recipe' needs this key",
    ]


def test_valid_config_has_no_problems():
    cfg = {
        "output_dir": "/tmp/o",
        "value": 2,
        "points": [{"_component_": f"{M}.Point", "x": 1}],
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.95]},
        "extra": {"_component_": f"{M}.flexible", "a": 1, "anything": [1]},
    }
    assert _problems({k: v for k, v in cfg.items() if k != "extra"}, read_schema(RECIPE)) == []
    # Without a schema only components are checked; a top-level one may get arguments from the recipe
    # (the optimizer's params), a nested one may not.
    assert _problems(cfg) == []
    nested = {"outer": {"inner": {"_component_": "torch.optim.AdamW", "lr": 1e-3}}, "listed": [cfg["optimizer"]]}
    assert _problems(nested) == [
        "outer.inner.params: missing required argument of torch.optim.AdamW; set outer.inner.params=..."]


def test_unsupported_keys_are_refused_when_true():
    schema = read_schema(RECIPE)
    assert _problems({"output_dir": "/o", "offload": False, "reduce_op": "sum"}, schema) == []
    assert _problems({"output_dir": "/o", "offload": True, "reduce_op": "max"}, schema) == [
        "offload=true is not supported: sum_recipe keeps everything on the host; set offload=false",
        "reduce_op=max is not supported: sum_recipe only sums; remove the key",
    ]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps", "xpu", "meta", None])
def test_device_forms_torch_accepts(device):
    assert _problems({"device": device, "extra": {"_component_": f"{M}.flexible", "a": 1, "device": device}}) == []


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "cuda:-1", "cuda:01", "cuda:0:1", ""])
def test_device_forms_torch_refuses(device):
    expected = f"expected a device such as cpu, cuda, cuda:N (N a GPU index), mps or xpu, got {device!r}"
    assert _problems({"device": device, "nested": {"device": device}}) == [f"device: {expected}",
                                                                          f"nested.device: {expected}"]


def test_a_component_of_a_package_not_installed():
    assert _problems({"optimizer": {"_component_": "bitsandbytes.optim.PagedAdamW8bit", "lr": 1e-3}}) == [
        "optimizer._component_: package 'bitsandbytes' is not installed (pip install bitsandbytes)"]
    assert _problems({"optimizer": {"_component_": "toch.optim.AdamW"}})[0].startswith(
        "optimizer._component_: unknown component 'toch.optim.AdamW': no package 'toch' is installed. "
        "Did you mean 'torch'")


def test_resolution_problems_name_each_key():
    cfg = OmegaConf.create({"out": "???", "log": "${out}/logs", "other": "${nope}", "fine": 1})
    assert [str(p) for p in resolution_problems(cfg)] == [
        "out: a value is required (the config has ???); set it with out=...",
        "log: it refers to out, which has no value (???)",
        "other: cannot resolve its value: Interpolation key 'nope' not found",
    ]


def test_a_recipe_to_check_against_must_have_a_config(tmp_path):
    (tmp_path / "plain.py").write_text("def recipe(cfg):\n    pass\n")
    (tmp_path / "broken.py").write_text("class Config(RecipeConfig:\n")
    with pytest.raises(QattuneError) as err:
        require_schema(tmp_path / "plain.py")
    assert str(err.value) == (f"recipe {tmp_path / 'plain.py'} declares no Config class (a RecipeConfig subclass "
                              "listing the keys it reads), so a config cannot be checked against it; add one, as "
                              "the shipped recipes do")
    with pytest.raises(QattuneError, match=r"^recipe .*broken.py has a syntax error at line 1: "):
        require_schema(tmp_path / "broken.py")


def test_torchtune_config_components():
    cfg = {
        "quantizer": {"_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer", "groupsize": 32},
        "logger": {"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "p"},
        "other": {"_component_": "torchtune.rlhf.loss.DPOLoss"},
        "misspelt": {"_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer", "groupsze": 32},
    }
    problems = _problems(cfg)
    assert problems == [
        "logger._component_: torchtune component 'torchtune.training.metric_logging.WandBLogger' has no qattune "
        "counterpart: Weights & Biases logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger",
        "other._component_: torchtune component 'torchtune.rlhf.loss.DPOLoss' has no qattune counterpart: it is not "
        "in qattune's torchtune mapping (qattune/config/aliases.py); use a qattune component",
        "misspelt.groupsze: qattune.quant.QATQuantizer takes no argument 'groupsze'. Did you mean 'group_size'?",
    ]
