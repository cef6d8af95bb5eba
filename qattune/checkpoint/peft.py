"""LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

`PeftModel.from_pretrained(transformers_model, folder)` loads what qattune writes and computes the same
logits as qattune's LoRA model; `load_peft_adapter` reads adapters PEFT (or torchtune) wrote. Tensor names are
PEFT's: `base_model.model.<Hugging Face module>.lora_A.weight` ([rank, in]) and `.lora_B.weight` ([out, rank]),
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. The scale is `lora_alpha / r`.

Keep an adapter out of a model folder: transformers' `from_pretrained(folder)` applies an adapter_config.json
it finds there on top of the folder's weights, so a merged model would get its adapter twice. Beside a merged
checkpoint, write the adapter to a subfolder (`step_N/adapter/`); `write_peft_adapter` refuses otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qattune.checkpoint.atomic import atomic_directory
from qattune.errors import QattuneError
from qattune.models.adapters import get_adapter
from qattune.models.lora import (
    ATTN_MODULES,
    MLP_MODULES,
    OUTPUT_MODULE,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
)
from qattune.models.transformer import TransformerConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}
# PEFT options that change what an adapter computes; qattune's LoRA is the plain one (their defaults).
_PLAIN_LORA = {"bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None}  # fmt: skip


def _hf_module_names(model: nn.Module, model_type: str) -> dict[str, str]:
    """qattune module name -> Hugging Face module name for every weight of the model."""
    config = getattr(model, "config", None)
    if not isinstance(config, TransformerConfig):
        raise QattuneError(f"PEFT adapters need a qattune Transformer; got {type(model).__name__}")
    names = get_adapter(model_type).names("hf", config)
    return {ours[: -len(".weight")]: theirs[: -len(".weight")] for ours, theirs in names.items()
            if ours.endswith(".weight")}  # fmt: skip


def _number(value: float) -> Union[int, float]:
    return int(value) if float(value).is_integer() else float(value)


def _uniform(modules: list[tuple[str, LoRALinear]], what: str, value_of: Any) -> Any:
    values = {value_of(m) for _, m in modules}
    if len(values) != 1:
        raise QattuneError(f"cannot write a PEFT adapter: LoRA layers differ in {what} ({sorted(values)}); "
                           "PEFT's adapter_config.json holds one value")  # fmt: skip
    return values.pop()


def _dropout_p(module: LoRALinear) -> float:
    return float(module.dropout.p) if isinstance(module.dropout, nn.Dropout) else 0.0


def _adapted(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    modules = list(lora_modules(model))
    if not modules:
        raise QattuneError(f"model {type(model).__name__} has no LoRA adapters to save; apply LoRA first")
    return modules


def peft_adapter_config(
    model: nn.Module, *, base_model_name_or_path: Optional[str] = None, model_type: str = "llama"
) -> dict[str, Any]:
    """The adapter_config.json PEFT expects for the model's adapters."""
    modules = _adapted(model)
    hf_names = _hf_module_names(model, model_type)
    adapted = sorted(hf_names[name] for name, _ in modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    every_with_leaf = sorted(n for n in hf_names.values() if n.rsplit(".", 1)[-1] in leaves)
    # PEFT matches a target by its last name component; list full names when only some layers have adapters.
    targets = leaves if every_with_leaf == adapted else adapted
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": _uniform(modules, "rank", lambda m: m.rank),
        "lora_alpha": _number(_uniform(modules, "alpha", lambda m: m.alpha)),
        "lora_dropout": _uniform(modules, "dropout", _dropout_p),
        "target_modules": targets,
        "init_lora_weights": True,
        "layers_pattern": None,
        **_PLAIN_LORA,
    }


def peft_adapter_tensors(
    model: nn.Module, *, model_type: str = "llama", dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (on CPU, contiguous; cast to `dtype` if given)."""
    hf_names = _hf_module_names(model, model_type)
    out = {}
    for name, module in _adapted(model):
        prefix = PEFT_PREFIX + hf_names[name]
        for suffix, attr in _LORA_SUFFIXES.items():
            tensor = getattr(module, attr).detach()
            out[prefix + suffix] = (tensor if dtype is None else tensor.to(dtype)).contiguous().cpu()
    return out


def write_peft_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[str] = None,
    model_type: str = "llama",
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write the two adapter files into `directory` (created if needed; e.g. a subfolder inside a checkpoint's
    atomic save). A folder holding a model (config.json) is refused: see the module docstring."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        raise QattuneError(
            f"{directory} holds a model (config.json): transformers would apply an adapter saved there on top of "
            "that model's weights; write the adapter to a subfolder such as 'adapter'"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(model, base_model_name_or_path=base_model_name_or_path, model_type=model_type)
    save_file(peft_adapter_tensors(model, model_type=model_type, dtype=dtype), directory / ADAPTER_WEIGHTS_NAME,
              metadata={"format": "pt"})  # fmt: skip
    with open(directory / ADAPTER_CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_peft_adapter(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[str] = None,
    model_type: str = "llama",
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Save the model's LoRA adapters as a PEFT adapter folder `out_dir`, atomically; return its path.

    base_model_name_or_path: what PEFT records as the base model (a hub name or a local folder).
    model_type: the family whose Hugging Face names to use (llama, qwen2_5, ...).
    dtype: cast the adapter tensors (default: as trained).
    """
    with atomic_directory(out_dir) as tmp:
        write_peft_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path, model_type=model_type,
                           dtype=dtype)  # fmt: skip
    return Path(out_dir)


# --- loading -------------------------------------------------------------------------------------------


def read_peft_config(adapter_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """adapter_config.json, checked to describe a plain LoRA adapter qattune can compute."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise QattuneError(f"{path} not found; a PEFT adapter folder holds {ADAPTER_CONFIG_NAME} and "
                           f"{ADAPTER_WEIGHTS_NAME}") from None  # fmt: skip
    except json.JSONDecodeError as err:
        raise QattuneError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if config.get("peft_type") != "LORA":
        raise QattuneError(f"{path}: peft_type is {config.get('peft_type')!r}; qattune loads LORA adapters only")
    for key, plain in _PLAIN_LORA.items():
        value = config.get(key, plain)
        if value != plain and not (plain is None and value in ([], {})):
            raise QattuneError(f"{path}: {key}={json.dumps(value)} is not supported; qattune loads plain LoRA "
                               f"adapters ({key}={json.dumps(plain)})")  # fmt: skip
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise QattuneError(f"{path}: '{key}' must be a positive number, got {config.get(key)!r}")
    return config


def _adapter_state_dict(
    tensors: dict[str, torch.Tensor], to_qattune: dict[str, str], source: str
) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> `lora_state_dict` names."""
    out = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        hf_module = key[len(PEFT_PREFIX): -len(suffix)] if suffix and key.startswith(PEFT_PREFIX) else None
        if hf_module not in to_qattune:
            raise QattuneError(f"{source}: tensor '{key}' is not a LoRA A/B weight of a layer of this model")
        out[f"{to_qattune[hf_module]}.{_LORA_SUFFIXES[suffix]}"] = tensor
    return out


def _lora_settings_for(modules: set[str], config: dict[str, Any], model: nn.Module, source: str) -> dict[str, Any]:
    """apply_lora's arguments that adapt exactly `modules` (qattune names)."""
    all_layers = {name for name, _ in model.named_modules()}

    def every(suffix: str) -> set[str]:
        return {n for n in all_layers if n == suffix or n.endswith("." + suffix)}

    attn = [tt for tt, suffix in ATTN_MODULES.items() if every(suffix) & modules]
    mlp = any(every(suffix) & modules for suffix in MLP_MODULES)
    output = OUTPUT_MODULE in modules
    expressible = set().union(*(every(ATTN_MODULES[tt]) for tt in attn), *(every(s) for s in MLP_MODULES if mlp))
    if output:
        expressible.add(OUTPUT_MODULE)
    if expressible != modules:
        odd = sorted(expressible ^ modules)[0]
        raise QattuneError(
            f"{source}: the adapter's layers cannot be expressed as qattune LoRA settings (near '{odd}'): "
            "qattune adapts a projection in every layer, and gate/up/down together; apply_lora to the model first"
        )
    return dict(lora_attn_modules=attn, apply_lora_to_mlp=mlp, apply_lora_to_output=output,
                lora_rank=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                lora_dropout=float(config.get("lora_dropout") or 0.0))  # fmt: skip


def load_peft_adapter(
    model: nn.Module, adapter_dir: Union[str, os.PathLike], *, model_type: str = "llama"
) -> nn.Module:
    """Load a PEFT LoRA adapter into `model` (in place; returns it).

    A model without adapters gets them first, with the rank, alpha, dropout and layers the adapter has
    (its base may already be fake-quantized or quantized). A model with adapters must have the same layers.
    """
    config = read_peft_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise QattuneError(f"{path} not found; the PEFT adapter folder is incomplete") from None
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise QattuneError(f"cannot read safetensors file {path}: {str(err).splitlines()[0]}") from None
    to_qattune = {theirs: ours for ours, theirs in _hf_module_names(model, model_type).items()}
    state_dict = _adapter_state_dict(tensors, to_qattune, str(path))
    in_file = {key.rsplit(".", 1)[0] for key in state_dict}
    present = {name for name, _ in lora_modules(model)}
    if not present:
        apply_lora(model, **_lora_settings_for(in_file, config, model, str(path)))
    elif present != in_file:
        odd = sorted(present ^ in_file)[0]
        raise QattuneError(f"{path}: the adapter's layers differ from the model's LoRA layers (e.g. '{odd}')")
    for _, module in lora_modules(model):
        if module.rank != int(config["r"]) or module.alpha != float(config["lora_alpha"]):
            raise QattuneError(
                f"{path}: r={config['r']}, lora_alpha={config['lora_alpha']} but the model's LoRA layers have "
                f"rank {module.rank}, alpha {module.alpha}; use the adapter's settings"
            )
    load_lora_state_dict(model, state_dict, source=str(path))
    return model


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "load_peft_adapter",
    "peft_adapter_config",
    "peft_adapter_tensors",
    "read_peft_config",
    "save_peft_adapter",
    "write_peft_adapter",
]
