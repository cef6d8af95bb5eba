"""Loading configs: shipped names vs paths, `defaults:` composition, and friendly errors."""

import pytest
from omegaconf import OmegaConf

from qattune.config.loader import load_config
from qattune.errors import QattuneError


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_compose_parent_then_self(tmp_path):
    _write(tmp_path / "base.yaml", "a: 1\nb: {x: 1, y: 2}\nname: base\n")
    child = _write(tmp_path / "child.yaml", "defaults: [base]\nb: {y: 20}\nname: child\n")
    cfg = load_config(str(child))
    assert OmegaConf.to_container(cfg) == {"a": 1, "b": {"x": 1, "y": 20}, "name": "child"}


def test_self_position_and_chained_parents(tmp_path):
    _write(tmp_path / "root.yaml", "v: root\nonly_root: 1\n")
    _write(tmp_path / "mid.yaml", "defaults: [root]\nv: mid\n")
    child = _write(tmp_path / "leaf.yaml", "defaults: [_self_, mid]\nv: leaf\nown: 2\n")
    cfg = load_config(str(child))
    assert cfg.v == "mid"  # _self_ first, so the parent wins
    assert cfg.only_root == 1 and cfg.own == 2 and "defaults" not in cfg


def test_overrides_apply_after_composition(tmp_path):
    _write(tmp_path / "base.yaml", "lr: 1.0\n")
    child = _write(tmp_path / "c.yaml", "defaults: [base]\n")
    assert load_config(str(child), ["lr=0.5"]).lr == 0.5


def test_inheritance_cycle(tmp_path):
    _write(tmp_path / "a.yaml", "defaults: [b]\n")
    _write(tmp_path / "b.yaml", "defaults: [a]\n")
    with pytest.raises(QattuneError, match=r"^config inheritance loops: a.yaml -> b.yaml -> a.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_missing_parent(tmp_path):
    child = _write(tmp_path / "c.yaml", "defaults: [nowhere]\n")
    with pytest.raises(QattuneError, match=r"'defaults' names 'nowhere', which cannot be found"):
        load_config(str(child))


def test_unreadable_yaml_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(QattuneError) as err:
        load_config(str(bad))
    message = str(err.value)
    assert message.startswith(f"cannot read YAML in {bad}, line ") and "fix the file's syntax" in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    bad = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(QattuneError, match="must be a YAML mapping"):
        load_config(str(bad))


def test_config_file_not_found():
    with pytest.raises(QattuneError) as err:
        load_config("/no/such/dir/my.yaml")
    assert str(err.value) == (
        "config file not found: /no/such/dir/my.yaml (check the path, or run `qattune ls` for shipped configs)")


def test_unknown_config_name_suggests_closest():
    with pytest.raises(QattuneError) as err:
        load_config("tiny/qat_ful")
    message = str(err.value)
    assert message.startswith("unknown config 'tiny/qat_ful': neither a shipped config nor a file. "
                              "Did you mean 'tiny/qat_full'")  # the closest name first
    assert message.endswith("? Run `qattune ls` to list shipped configs")


def test_header_recipe_is_inherited_from_parents(tmp_path):
    from qattune.config.discovery import find_config
    from qattune.config.loader import header_recipe

    own = _write(tmp_path / "own.yaml", "# recipe: eval\ndefaults: [tiny/qat_full]\n")
    child = _write(tmp_path / "child.yaml", "defaults: [tiny/qat_full]\nbatchsize: 4\n")
    grandchild = _write(tmp_path / "grandchild.yaml", "defaults: [child]\n")
    two = _write(tmp_path / "two.yaml", "defaults: [tiny/qat_full, own]\n")
    none = _write(tmp_path / "none.yaml", "a: 1\n")
    shipped = find_config("tiny/qat_full").resolve()
    assert header_recipe(own) == ("eval", own.resolve())  # the file's own header wins
    assert header_recipe(child) == ("qat_distributed", shipped)
    assert header_recipe(grandchild) == ("qat_distributed", shipped)
    assert header_recipe(two) == ("eval", own.resolve())  # the last parent merges last
    assert header_recipe(none) is None


def test_header_recipe_stops_at_a_loop(tmp_path):
    from qattune.config.loader import header_recipe

    _write(tmp_path / "a.yaml", "defaults: [b]\n")
    _write(tmp_path / "b.yaml", "defaults: [a]\n")
    assert header_recipe(tmp_path / "a.yaml") is None
