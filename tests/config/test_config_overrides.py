"""Command-line overrides: every form of hydra's grammar, and the errors for bad ones."""

import pytest
from omegaconf import OmegaConf

from qattune.config.overrides import apply_overrides
from qattune.errors import QattuneError


def _cfg():
    return OmegaConf.create({
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
        "model": {"_component_": "qattune.models.llama3_2_1b"},
        "batch_size": 4,
        "tags": ["a"],
        "output_dir": "/tmp/x",
        "log_dir": "${output_dir}/logs",
        "required": "???",
    })


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("batch_size=8", "batch_size", 8),
        ("optimizer.lr=2e-5", "optimizer.lr", 2e-5),
        ("tags=[1,2]", "tags", [1, 2]),
        ("tags=[]", "tags", []),
        ("optimizer={_component_: torch.optim.SGD, lr: 0.1}", "optimizer", {"_component_": "torch.optim.SGD", "lr": 0.1}),
        ("output_dir='/a b/c'", "output_dir", "/a b/c"),
        ("batch_size=null", "batch_size", None),
        ("+new.key=true", "new.key", True),
        ("++batch_size=16", "batch_size", 16),
        ("++brand_new=x", "brand_new", "x"),
        ("model=qattune.models.smollm2_135m", "model._component_", "qattune.models.smollm2_135m"),
        ("required=5", "required", 5),
        ("optimizer.betas=[0.8,0.9]", "optimizer.betas", [0.8, 0.9]),  # a component's argument: no + needed
    ],
)
def test_override_forms(override, key, expected):
    plain = OmegaConf.to_container(apply_overrides(_cfg(), [override]))
    for part in key.split("."):
        plain = plain[part]
    assert plain == expected


def test_component_shorthand_keeps_arguments():
    cfg = apply_overrides(_cfg(), ["optimizer=torch.optim.SGD"])
    assert OmegaConf.to_container(cfg.optimizer) == {"_component_": "torch.optim.SGD", "lr": 1e-3}


def test_delete_and_interpolation():
    cfg = apply_overrides(_cfg(), ["~tags", "output_dir=/data/run1"])
    assert "tags" not in cfg
    assert cfg.log_dir == "/data/run1/logs"
    cfg = apply_overrides(_cfg(), ["+bs_copy=${batch_size}"])
    assert cfg.bs_copy == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_sise=8", "cannot override 'batch_sise': the config has no such key. Did you mean 'batch_size'? "
                         "To add it, write +batch_sise=8"),
        ("+batch_size=8", "cannot add 'batch_size' (+batch_size=8): the key already exists; write batch_size=... "
                          "to change it or ++batch_size=8 to force"),
        ("~optimizer.lrr", "cannot delete 'optimizer.lrr' (~optimizer.lrr): the config has no such key. "
                           "Did you mean 'optimizer.lr'?"),
        ("batch_size", "override 'batch_size' has no '=': write key=value to change a key, +key=value to add one, "
                       "~key to delete one"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), [override])
    assert str(err.value) == message


def test_unparseable_override_is_one_line():
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), ["tags=[1,2"])
    text = str(err.value)
    assert text.startswith("cannot parse override 'tags=[1,2': ") and "\n" not in text


def test_all_bad_overrides_reported_together():
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), ["batch_sise=1", "nothing", "+tags=[]"])
    assert len(str(err.value).splitlines()) == 3


def test_recipe_keys_can_be_set_without_plus():
    cfg = apply_overrides(_cfg(), ["epochs=3"], known_keys={"epochs", "seed"})
    assert cfg.epochs == 3
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), ["epoch=3"], known_keys={"epochs"})
    # `+epoch=3` would fail validation too, so it is not suggested
    assert str(err.value) == "cannot override 'epoch': neither the config nor its recipe has such a key. Did you mean 'epochs'?"


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompt=Tell me a joke, please",
         "override 'prompt=Tell me a joke, please' is a sweep (a comma separates values), which qattune does not "
         "support; quote a value that contains a comma: \"prompt='Tell me a joke, please'\""),
        ("+tags=1,2", "override '+tags=1,2' is a sweep (a comma separates values), which qattune does not support; "
                      "quote a value that contains a comma: \"+tags='1,2'\""),
        ("batch_size=range(1,3)", "override 'batch_size=range(1,3)' is a sweep (range()), which qattune does not "
                                  "support; set a single value"),
        ("batch_size=choice(1,2)", "override 'batch_size=choice(1,2)' is a sweep (choice()), which qattune does not "
                                   "support; set a single value"),
        ("output_dir=glob(*)", "override 'output_dir=glob(*)' is a sweep (glob()), which qattune does not support; "
                               "set a single value"),
    ],
)
def test_sweeps_are_refused_in_one_line(override, message):
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), [override])
    assert str(err.value) == message


def test_a_quoted_comma_is_a_value():
    assert apply_overrides(_cfg(), ["+prompt='Tell me a joke, please'"]).prompt == "Tell me a joke, please"


def test_an_override_omegaconf_refuses_is_one_line():
    with pytest.raises(QattuneError) as err:
        apply_overrides(_cfg(), ["+tags.x=1"])
    assert str(err.value) == "cannot apply override '+tags.x=1': invalid literal for int() with base 10: 'x'"


def test_list_items_by_index():
    assert apply_overrides(_cfg(), ["tags.0=b"]).tags == ["b"]
    assert apply_overrides(_cfg(), ["~tags.0"]).tags == []
