"""The quantizer options a QAT run trained with against those `quantize` is given: which differ, and
the overrides that make them agree, spelt as the user's config spells its quantizer (a torchtune
quantizer's `groupsize`, the `+` for a key the config lacks, `~` for one that must become null)."""

from __future__ import annotations

import json
from pathlib import Path

from qattune.config.aliases import torchtune_alias
from qattune.errors import QattuneError
from qattune.quant.schemes import resolve_scheme_config

TRAINED_OPTIONS = ("scheme", "group_size", "quantize_activations", "quantize_embedding", "quantize_output",
                   "include", "exclude", "output_head_pattern")


def _yaml(value) -> str:
    """A value as an override spells it (null, true, 32, [a, b])."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(repr(str(v)) for v in value) + "]"
    return str(value)


def differing_options(trained: dict, ours: dict) -> list[str]:
    """The quantizer options (TRAINED_OPTIONS) the training run recorded with another value than ours."""
    def same(a, b) -> bool:
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    return [key for key in TRAINED_OPTIONS if key in trained and not same(trained[key], ours.get(key))]


def _spelling(quantizer_cfg, key: str) -> tuple[str, bool]:
    """The config's name for quantizer option `key` (torchtune's for a torchtune quantizer), and whether
    the component fixes it (a torchtune quantizer class fixes its scheme)."""
    alias = torchtune_alias(str(quantizer_cfg.get("_component_", "")))
    if alias is None:
        return key, False
    return alias.spelling(key), key in alias.fixed


def _needed(trained: dict, differences: list[str], quantizer_cfg) -> list[str]:
    """The differing options to set: all but those the config leaves out and the trained scheme's
    defaults give (they follow once the scheme is set)."""
    defaults = resolve_scheme_config(trained["scheme"]).to_dict()
    return [key for key in differences if key in ("scheme", "group_size")
            or _spelling(quantizer_cfg, key)[0] in quantizer_cfg or trained[key] != defaults.get(key)]


def _override(quantizer_cfg, key: str, value) -> str:
    """The override setting quantizer option `key` to `value` in this config ('+' for a key it lacks, '~'
    to drop one for null); '' when it need not (null and absent)."""
    name, _ = _spelling(quantizer_cfg, key)
    present = name in quantizer_cfg
    if value is None:
        return f"~quantizer.{name}" if present else ""
    return f"{'' if present else '+'}quantizer.{name}={_yaml(value)}"


def mismatch_message(source: str, record: str, trained: dict, differences: list[str], quantizer_cfg,
                     action: str = "quantize") -> str:
    """One line: what checkpoint `source` was trained with (by its training `record` file), and the
    overrides that make `quantizer_cfg` (the config's quantizer node) agree, to `action` ("quantize")."""
    group = f" with group size {trained.get('group_size')}" if trained.get("group_size") else ""
    others = "".join(f", {key}={_yaml(trained[key])}" for key in differences if key not in ("scheme", "group_size"))
    needed = _needed(trained, differences, quantizer_cfg)
    if "scheme" in needed and _spelling(quantizer_cfg, "scheme")[1]:
        options = ", ".join(f"{key}: {_yaml(trained[key])}" for key in needed if trained[key] is not None)
        advice = (f"{quantizer_cfg['_component_']} always quantizes with another scheme: use "
                  f"quantizer='{{_component_: qattune.quant.QATQuantizer, {options}}}'")
    else:
        overrides = " ".join(o for o in (_override(quantizer_cfg, key, trained[key]) for key in needed) if o)
        advice = f"{action} with the same options: {overrides}"
    return f"{source} was trained with scheme {trained['scheme']!r}{group}{others} ({record}); {advice}"


def _trained_and_differences(record: Path, quantizer) -> tuple[dict, list[str]]:
    """The quantizer options the run recorded in `record` (its step folder's training info), and those
    `quantizer` has otherwise (none without a record, or for a quantizer without a scheme config)."""
    trained = json.loads(record.read_text()).get("quantizer") if record.is_file() else None
    ours = getattr(quantizer, "config", None)
    if trained is None or ours is None or "scheme" not in trained or not hasattr(ours, "to_dict"):
        return {}, []
    return trained, differing_options(trained, ours.to_dict())


def refuse_other_options_on_resume(record: Path, quantizer, quantizer_cfg) -> None:
    """A resumed run trains on with the quantizer options its checkpoint trained with (recorded in
    `record`): another scheme or group size would mix two trainings under one record. One error line
    with the overrides that agree."""
    trained, differences = _trained_and_differences(record, quantizer)
    if differences:
        raise QattuneError(mismatch_message(str(record.parent), record.name, trained, differences, quantizer_cfg,
                                            action="resume"))


def agrees_with_training(record: Path, quantizer, quantizer_cfg, match_training: bool) -> bool:
    """Whether `quantizer` (built from the config node `quantizer_cfg`) has the options the QAT run
    recorded in `record` (its step folder's training info; true without one). A difference is one
    error line with the fixing overrides, or with `match_training` off a warning."""
    trained, differences = _trained_and_differences(record, quantizer)
    if differences and match_training:
        raise QattuneError(mismatch_message(str(record.parent), record.name, trained, differences, quantizer_cfg)
                           + "; or match_training=false to quantize it with these options anyway (PTQ of its "
                           "weights: QAT learnt its own scheme's roundings)")
    if differences:
        print(f"warning: {record.parent} was trained with other quantizer options ({', '.join(differences)}): "
              "quantizing its weights without them (match_training=false)", flush=True)
    return not differences
