"""instantiate / partial: nested components, call-time arguments, factories, torchtune aliases."""

import functools

import pytest
from omegaconf import OmegaConf

import qt_fixture_components as fx
from qattune.config import instantiate, partial
from qattune.config.aliases import TORCHTUNE_COMPONENTS, torchtune_alias
from qattune.errors import QattuneError

M = "qt_fixture_components"


def test_nested_components_are_built_first():
    cfg = OmegaConf.create({"pair": {"_component_": f"{M}.make_pair", "first": {"_component_": f"{M}.Point", "x": 1},
                                     "second": {"_component_": f"{M}.Point3", "x": 2, "y": 3}, "label": "L"}})
    first, second, label = instantiate(cfg.pair)
    assert (type(first), first.x, first.y) == (fx.Point, 1, 0)
    assert (type(second), second.x, second.y) == (fx.Point3, 2, 3)
    assert label == "L"


def test_call_time_arguments_merge_and_win():
    cfg = OmegaConf.create({"p": {"_component_": f"{M}.make_pair", "label": "from-config"}})
    assert instantiate(cfg.p, "positional") == ("positional", None, "from-config")
    assert instantiate(cfg.p, "positional", label="call") == ("positional", None, "call")


def test_interpolations_resolve_before_building():
    cfg = OmegaConf.create({"factor": 3.0, "s": {"_component_": f"{M}.scaled", "values": [1, 2], "factor": "${factor}"}})
    assert instantiate(cfg.s) == [3.0, 6.0]


def test_partial_forms():
    cfg = OmegaConf.create({"s": {"_component_": f"{M}.scaled", "factor": 10.0},
                            "t": {"_component_": f"{M}.scaled", "_partial_": True, "factor": 0.5}})
    factory = partial(cfg.s)
    assert isinstance(factory, functools.partial) and factory([1.0]) == [10.0]
    assert instantiate(cfg.t)([4.0]) == [2.0]


def test_plain_nodes_and_none():
    assert instantiate(None) is None
    cfg = OmegaConf.create({"d": {"a": 1, "p": {"_component_": f"{M}.Point", "x": 5}}})
    built = instantiate(cfg.d)
    assert built["a"] == 1 and built["p"].x == 5


def test_dataclass_component():
    cfg = OmegaConf.create({"s": {"_component_": f"{M}.Settings", "name": "n", "mode": "exact"}})
    assert instantiate(cfg.s) == fx.Settings("n", 1.0, "exact")


def test_unknown_component_error():
    cfg = OmegaConf.create({"model": {"_component_": f"{M}.Pointt", "x": 1}})
    with pytest.raises(QattuneError) as err:
        instantiate(cfg.model)
    assert str(err.value) == f"model: unknown component '{M}.Pointt'. Did you mean '{M}.Point' or '{M}.Point3'?"


def test_a_package_not_installed_is_named():
    cfg = OmegaConf.create({"optimizer": {"_component_": "bitsandbytes.optim.PagedAdamW8bit"}})
    with pytest.raises(QattuneError) as err:
        instantiate(cfg.optimizer)
    assert str(err.value) == "optimizer: package 'bitsandbytes' is not installed (pip install bitsandbytes)"


def test_wrong_argument_error_names_the_key():
    cfg = OmegaConf.create({"model": {"_component_": f"{M}.Point", "x": 1, "z": 1}})
    with pytest.raises(QattuneError) as err:
        instantiate(cfg.model)
    assert str(err.value) == "model: cannot call Point: got an unexpected keyword argument 'z'"


def test_torchtune_alias_translation():
    alias = torchtune_alias("torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer")
    assert alias.target == "qattune.quant.QATQuantizer"
    assert alias.translate({"groupsize": 256, "padding_allowed": False}) == {"scheme": "8da4w", "group_size": 256}
    hf = torchtune_alias("torchtune.training.FullModelHFCheckpointer")
    assert hf.translate({"checkpoint_dir": "/m", "recipe_checkpoint": None, "model_type": "LLAMA3_2"}) == {
        "checkpoint_dir": "/m", "model_type": "LLAMA3_2"}


def test_torchtune_builder_naming_rule():
    assert torchtune_alias("torchtune.models.llama3_2.llama3_2_1b").target == "qattune.models.llama3_2_1b"
    assert torchtune_alias("torchtune.models.llama3_2.lora_llama3_2_3b").target == "qattune.models.lora_llama3_2_3b"
    assert torchtune_alias("torchtune.models.llama3.llama3_tokenizer").target == "qattune.tokenizers.llama3_tokenizer"
    assert torchtune_alias("torch.optim.AdamW") is None


def test_torchtune_component_without_counterpart():
    cfg = OmegaConf.create({"metric_logger": {"_component_": "torchtune.training.metric_logging.WandBLogger"}})
    with pytest.raises(QattuneError) as err:
        instantiate(cfg.metric_logger)
    assert str(err.value) == (
        "metric_logger: torchtune component 'torchtune.training.metric_logging.WandBLogger' has no qattune "
        "counterpart: Weights & Biases logging is not part of qattune; use qattune.training.JSONLLogger or "
        "TensorBoardLogger")
    unmapped = torchtune_alias("torchtune.rlhf.loss.DPOLoss")
    assert unmapped.target is None and "not in qattune's torchtune mapping" in unmapped.reason


def test_alias_table_targets_are_qattune_paths():
    for path, alias in TORCHTUNE_COMPONENTS.items():
        assert path.startswith("torchtune.")
        assert alias.target is None and alias.reason or alias.target.startswith("qattune.")
