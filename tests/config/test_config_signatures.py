"""Reading component signatures from source, without importing them."""

import subprocess
import sys

import pytest

from qattune.config.signatures import UnknownComponent, component_signature

M = "qt_fixture_components"


def _summary(path):
    sig = component_signature(path)
    return [(p.name, p.required, p.annotation.kind) for p in sig.params], sig.var_keyword


def test_function_class_inherited_and_dataclass():
    assert _summary(f"{M}.make_pair") == ([("first", True, "any"), ("second", False, "opaque"), ("label", False, "str")], False)
    assert _summary(f"{M}.Point3") == ([("x", True, "int"), ("y", False, "int")], False)
    assert _summary(f"{M}.Settings") == ([("name", True, "str"), ("scale", False, "float"), ("mode", False, "literal")], False)
    assert _summary(f"{M}.flexible") == ([("a", True, "int")], True)


def test_reexport_is_followed():
    assert _summary(f"{M}.reexported_builder") == ([("width", True, "int"), ("depth", False, "int")], False)


def test_unknown_names():
    with pytest.raises(UnknownComponent) as err:
        component_signature(f"{M}.Pointt")
    assert f"{M}.Point" in err.value.candidates
    with pytest.raises(UnknownComponent):
        component_signature("no_such_package_xyz.thing")


def test_torch_components_are_read_without_importing_torch():
    code = (
        "import sys\n"
        "from qattune.config.signatures import component_signature\n"
        "for p in ['torch.optim.AdamW', 'torch.nn.Linear', 'torch.optim.lr_scheduler.CosineAnnealingLR']:\n"
        "    component_signature(p)\n"
        "sig = component_signature('torch.optim.AdamW')\n"
        "print([p.name for p in sig.params][:4], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['params', 'lr', 'betas', 'eps'] False"
