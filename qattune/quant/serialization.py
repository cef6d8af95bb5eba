"""Save and load converted models: safetensors with the packed tensors, plus a JSON quantization config.

`save_quantized(model, dir)` writes `dir/model.safetensors` (the converted model's state dict: packed
codes, scales, zeros and the float tensors of layers kept in float) and `dir/quantization_config.json`
(scheme, options, and every quantized and skipped layer). `load_quantized(model, dir)` takes the same
architecture — ideally built on the meta device, so no float weight is ever allocated — swaps in the
quantized modules built straight from the stored tensors, and loads the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qattune.errors import QattuneError
from qattune.quant.formats import NumericFormat
from qattune.quant.modules import QuantizedEmbedding, QuantizedLinear
from qattune.quant.modules.packed import BUFFER_NAMES
from qattune.quant.quantizer import QUANT_CONFIG_ATTR, _set_submodule
from qattune.quant.report import LayerRecord, QuantReport
from qattune.quant.schemes import SchemeConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"
CONFIG_FORMAT = "qattune.quantized/1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_entry(module: nn.Module) -> dict:
    if isinstance(module, QuantizedLinear):
        return {"kind": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "weight_format": module.weight_format.name,
                "activation_format": None if module.activation_format is None else module.activation_format.name,
                "weight_dtype": _dtype_name(module.weight_dtype)}
    return {"kind": "Embedding", "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx, "weight_format": module.weight_format.name,
            "weight_dtype": _dtype_name(module.weight_dtype)}


def quantization_config(model: nn.Module) -> dict:
    """The JSON-ready quantization config of a converted model."""
    info = getattr(model, QUANT_CONFIG_ATTR, None)
    if info is None:
        raise QattuneError("cannot save a quantized model that was not converted: run quantizer.convert(model) first")
    layers = {name: _layer_entry(m) for name, m in model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    skipped = [{"name": r["name"], "kind": r["kind"], "reason": r["reason"]}
               for r in info["report"]["layers"] if not r["quantized"]]
    return {"format": CONFIG_FORMAT, "quantization": info["config"], "quantized_layers": layers,
            "skipped_layers": skipped}


def untie_shared_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no two sharing memory (safetensors refuses tied weights): a tensor whose
    storage an earlier one uses is cloned."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def save_quantized(model: nn.Module, output_dir: Union[str, os.PathLike]) -> Path:
    """Write `model.safetensors` and `quantization_config.json` of a converted model to `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = quantization_config(model)
    tensors = untie_shared_tensors(model.state_dict())  # tied tensors are stored twice
    save_file(tensors, str(output_dir / WEIGHTS_FILE), metadata={"format": "pt", "qattune": CONFIG_FORMAT})
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return output_dir


def read_quantization_config(checkpoint_dir: Union[str, os.PathLike]) -> dict:
    """The quantization config of a saved quantized model (a QattuneError if there is none)."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise QattuneError(f"{path}: no quantization config; is {checkpoint_dir} a qattune quantized checkpoint?")
    config = json.loads(path.read_text())
    if config.get("format") != CONFIG_FORMAT:
        raise QattuneError(f"{path}: unsupported format {config.get('format')!r}; expected {CONFIG_FORMAT!r}")
    return config


def _linear_weight_format(name: str, entry: dict, scheme: SchemeConfig) -> NumericFormat:
    """The scheme's format for this Linear: the body format or the output-head format, by stored name."""
    for is_output in (False, True):
        fmt = scheme.weight_format("Linear", is_output)
        if fmt.name == entry["weight_format"]:
            return fmt
    raise QattuneError(f"{CONFIG_FILE}: layer {name!r} is stored as {entry['weight_format']!r}, which scheme "
                       f"{scheme.scheme!r} does not use; the config file was edited or is corrupt")


def _build_layer(name: str, entry: dict, scheme: SchemeConfig, tensors: dict[str, torch.Tensor]) -> nn.Module:
    packed = {b: tensors[f"{name}.{b}"] for b in BUFFER_NAMES if f"{name}.{b}" in tensors}
    if entry["kind"] == "Embedding":
        fmt = scheme.weight_format("Embedding", False)
        return QuantizedEmbedding(entry["num_embeddings"], entry["embedding_dim"], fmt, packed,
                                  entry["padding_idx"], getattr(torch, entry["weight_dtype"]))
    fmt = _linear_weight_format(name, entry, scheme)
    act = scheme.activation_format() if entry["activation_format"] is not None else None
    bias = tensors[f"{name}.bias"] if entry["bias"] else None
    return QuantizedLinear(entry["in_features"], entry["out_features"], fmt, act, packed, bias,
                           getattr(torch, entry["weight_dtype"]))


def load_quantized(model: nn.Module, checkpoint_dir: Union[str, os.PathLike],
                   device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a saved quantized model into `model` (same architecture, float or on the meta device)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_quantization_config(checkpoint_dir)
    scheme = SchemeConfig.from_dict(config["quantization"])
    weights = checkpoint_dir / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    quantized_keys = set()
    for name, entry in config["quantized_layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise QattuneError(f"{weights}: quantized layer {name!r} does not exist in the model; "
                               "load it into the architecture it was quantized from") from None
        layer = _build_layer(name, entry, scheme, tensors)
        _set_submodule(model, name, layer)
        quantized_keys.update(f"{name}.{key}" for key in layer.state_dict())
    rest = {k: v for k, v in tensors.items() if k not in quantized_keys}
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in quantized_keys]
    if missing or result.unexpected_keys:
        problem = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {result.unexpected_keys[0]!r}"
        raise QattuneError(f"{weights}: {problem} for this model; the checkpoint was saved from a different "
                           "architecture")
    records = [LayerRecord(name, e["kind"], (), True, e["weight_format"], e.get("activation_format"))
               for name, e in config["quantized_layers"].items()]
    records += [LayerRecord(s["name"], s["kind"], (), False, reason=s["reason"]) for s in config["skipped_layers"]]
    report = QuantReport("load", scheme.scheme, records)
    setattr(model, QUANT_CONFIG_ATTR, {"config": scheme.to_dict(), "report": report.to_dict()})
    return model
