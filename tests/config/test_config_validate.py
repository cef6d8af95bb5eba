"""Validation reports every mistake at once, one line each, with the key path and a suggestion."""

from pathlib import Path

from omegaconf import OmegaConf

from qattune.config import validate_config
from qattune.config.schema import read_schema

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
    assert set(schema.fields) == {"output_dir", "value", "seed", "points", "optimizer"}
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
    # Without a schema only components are checked, and nobody supplies the optimizer's params.
    assert _problems(cfg) == ["optimizer.params: missing required argument of torch.optim.AdamW; set optimizer.params=..."]


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
