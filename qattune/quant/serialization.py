"""Save and load converted models: safetensors with the packed tensors, plus a JSON quantization config.

`save_quantized(model, dir)` writes `dir/model.safetensors` (the converted model's state dict: packed
codes, scales, zeros and the float tensors of layers kept in float) and `dir/quantization_config.json`
(scheme, options, every quantized and skipped layer, and `tied_tensors`). A tensor is stored once: one
that is a view of another's memory, or a tensor of a tied layer (`tied_layers`, e.g. an output head tied
to the token embedding) bit-identical to its partner's, is left out of the safetensors and listed in
`tied_tensors` as `{name: stored name}`; loading makes it that very tensor again. With `hf_config`,
`config.json` is written too, with a `quantization_config` that transformers refuses to load
(`hf_quantization_config`). `load_quantized(model, dir)` takes the same architecture — ideally built on
the meta device, so no float weight is ever allocated — checks every stored tensor against the layout
the config describes, swaps in the quantized modules built straight from the stored tensors, and loads
the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qattune.errors import QattuneError
from qattune.quant.formats import NumericFormat
from qattune.quant.modules import QuantizedEmbedding, QuantizedLinear
from qattune.quant.modules.packed import BUFFER_NAMES, packed_tensors
from qattune.quant.quantizer import QUANT_CONFIG_ATTR, _set_submodule
from qattune.quant.report import LayerRecord, QuantReport
from qattune.quant.schemes import SchemeConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"
CONFIG_FORMAT = "qattune.quantized/2"  # /2: tensors of tied layers stored once (`tied_tensors`)
READABLE_FORMATS = ("qattune.quantized/1", CONFIG_FORMAT)
_REQUIRED_KEYS = ("quantization", "quantized_layers", "skipped_layers")
StoredInfo = tuple[tuple[int, ...], Optional[torch.dtype]]  # a stored tensor's shape and dtype (None: unknown)


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
    """The JSON-ready quantization config of a converted model (`tied_tensors` is added when saving)."""
    info = getattr(model, QUANT_CONFIG_ATTR, None)
    if info is None:
        raise QattuneError("cannot save a quantized model that was not converted: run quantizer.convert(model) first")
    layers = {name: _layer_entry(m) for name, m in model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    skipped = [{"name": r["name"], "kind": r["kind"], "reason": r["reason"]}
               for r in info["report"]["layers"] if not r["quantized"]]
    return {"format": CONFIG_FORMAT, "quantization": info["config"], "quantized_layers": layers,
            "skipped_layers": skipped}


def hf_quantization_config(config: dict) -> dict:
    """The `quantization_config` entry of a quantized folder's config.json. transformers cannot read
    qattune's packed tensors: given a `quant_method` it does not know, it only warns and builds a randomly
    initialised model, but it refuses (ValueError) a quantization config whose `quant_method` is null.
    The other fields say what the folder holds and what loads it."""
    quantization = config["quantization"]
    return {"quant_method": None, "format": config["format"], "scheme": quantization["scheme"],
            "group_size": quantization["group_size"],
            "load_with": f"qattune (qattune run generate|eval checkpoint_dir=<this folder>): packed tensors "
                         f"described in {CONFIG_FILE}, which transformers cannot load"}


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


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def _view_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def tied_tensors(tensors: Mapping[str, torch.Tensor], tied_layers: Mapping[str, str]) -> dict[str, str]:
    """`{name: stored name}` of the tensors to store once: a view of the same memory as an earlier tensor,
    or a tensor of a layer in `tied_layers` (`{layer: partner}`) bit-identical to its partner's."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = _view_key(tensor)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        seen.setdefault(key, name)
    for layer, partner in tied_layers.items():
        for buffer in ("weight", *BUFFER_NAMES):
            name, other = f"{layer}.{buffer}", f"{partner}.{buffer}"
            if name in tensors and other in tensors and name not in aliases \
                    and _same_bytes(tensors[name], tensors[other]):
                aliases[name] = aliases.get(other, other)
    return aliases


def save_quantized(model: nn.Module, output_dir: Union[str, os.PathLike], hf_config: Optional[dict] = None,
                   tied_layers: Optional[Mapping[str, str]] = None) -> Path:
    """Write `model.safetensors` and `quantization_config.json` of a converted model to `output_dir`, and
    `config.json` (`hf_config` plus `hf_quantization_config`) when `hf_config` is given. `tied_layers`
    (`{layer: partner}`, e.g. `{"output": "tok_embeddings"}`): layers whose weights the float model
    tied, stored once where their quantized tensors are identical."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = quantization_config(model)
    state = model.state_dict()
    config["tied_tensors"] = tied_tensors(state, tied_layers or {})
    stored = {name: t for name, t in state.items() if name not in config["tied_tensors"]}
    save_file(untie_shared_tensors(stored), str(output_dir / WEIGHTS_FILE),
              metadata={"format": "pt", "qattune": CONFIG_FORMAT})
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    if hf_config is not None:
        hf_config = {**hf_config, "quantization_config": hf_quantization_config(config)}
        (output_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return output_dir


def read_quantization_config(checkpoint_dir: Union[str, os.PathLike]) -> dict:
    """The quantization config of a saved quantized model; a QattuneError if there is none or it is not
    one qattune wrote."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise QattuneError(f"{path}: no quantization config; is {checkpoint_dir} a qattune quantized checkpoint?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QattuneError(f"{path} is not valid JSON ({err}); quantize the model again") from None
    found = config.get("format") if isinstance(config, dict) else None
    if found not in READABLE_FORMATS:
        raise QattuneError(f"{path}: unsupported format {found!r}; expected {CONFIG_FORMAT!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise QattuneError(f"{path} has no {missing[0]!r} entry; the file is incomplete: quantize the model again")
    try:
        SchemeConfig.from_dict(config["quantization"])
    except TypeError as err:
        raise QattuneError(f"{path}: 'quantization' is not a qattune scheme config ({err})") from None
    return config


def quantized_weights_file(checkpoint_dir: Union[str, os.PathLike]) -> Path:
    """The safetensors file of a saved quantized model (a QattuneError if it is missing)."""
    weights = Path(checkpoint_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise QattuneError(f"{weights} does not exist: a quantized checkpoint holds {WEIGHTS_FILE} beside "
                           f"{CONFIG_FILE}; quantize the model again")
    return weights


def _read_stored(checkpoint_dir: Union[str, os.PathLike], config: dict, device: Union[str, torch.device],
                 read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """`read(file, key)` of every stored tensor, and of each tied one the value of the tensor it shares."""
    weights = quantized_weights_file(checkpoint_dir)
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            values = {key: read(f, key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise QattuneError(f"cannot read safetensors file {weights}: {str(err).splitlines()[0]}") from None
    for name, stored in config.get("tied_tensors", {}).items():
        if stored not in values:
            raise QattuneError(f"{weights} lacks {stored!r}, which {CONFIG_FILE} says {name!r} shares; "
                               "quantize the model again")
        values[name] = values[stored]
    return values


def read_quantized_tensors(checkpoint_dir: Union[str, os.PathLike], config: dict,
                           device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a saved quantized model on `device`; a tied one is the very tensor it shares."""
    return _read_stored(checkpoint_dir, config, device, lambda f, key: f.get_tensor(key))


def _linear_weight_format(name: str, entry: dict, scheme: SchemeConfig, where: Path) -> NumericFormat:
    """The scheme's format for this Linear: the body format or the output-head format, by stored name."""
    for is_output in (False, True):
        fmt = scheme.weight_format("Linear", is_output)
        if fmt.name == entry["weight_format"]:
            return fmt
    raise QattuneError(f"{where}: layer {name!r} is stored as {entry['weight_format']!r}, which scheme "
                       f"{scheme.scheme!r} does not use; the config file was edited or is corrupt")


def _layer_format(name: str, entry: dict, scheme: SchemeConfig, where: Path) -> tuple[NumericFormat, tuple[int, int]]:
    """The weight format and logical weight shape of one stored layer."""
    if entry["kind"] == "Embedding":
        return scheme.weight_format("Embedding", False), (entry["num_embeddings"], entry["embedding_dim"])
    return _linear_weight_format(name, entry, scheme, where), (entry["out_features"], entry["in_features"])


def _layout(fmt: NumericFormat, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, tuple]:
    """The stored buffers' `{name: (shape, dtype)}` of a weight of `shape` in `fmt` (computed on meta)."""
    quantized = fmt.quantize(torch.empty(shape, dtype=dtype, device="meta"))
    return {name: (tuple(t.shape), t.dtype) for name, t in packed_tensors(quantized, fmt).items()}


def _check_layer_tensors(name: str, entry: dict, fmt: NumericFormat, shape: tuple[int, int],
                         stored: Mapping[str, StoredInfo], where: Path) -> None:
    """One line if the stored buffers of layer `name` (`stored`: shape and dtype, None when unknown, by
    tensor name) are not those `fmt` gives a weight of `shape`."""
    want = _layout(fmt, shape, getattr(torch, entry["weight_dtype"]))
    if entry.get("bias"):
        want["bias"] = ((shape[0],), None)
    for buffer, (want_shape, want_dtype) in want.items():
        found = stored.get(f"{name}.{buffer}")
        shape_differs = found is not None and tuple(found[0]) != want_shape
        dtype_differs = buffer == "weight_packed" and found is not None and found[1] not in (None, want_dtype)
        if found is None or shape_differs or dtype_differs:
            what = "is missing" if found is None else f"is {list(found[0])}"
            what += f" {_dtype_name(found[1])}" if dtype_differs and not shape_differs else ""
            need = f"{list(want_shape)}" + (f" {_dtype_name(want_dtype)}" if buffer == "weight_packed" else "")
            raise QattuneError(
                f"{where}: layer {name!r} ({fmt.name}, {list(shape)}) needs {name}.{buffer} {need}, but the "
                f"stored one {what}: the config and {WEIGHTS_FILE} do not belong together; quantize the model again")


def check_quantized_checkpoint(checkpoint_dir: Union[str, os.PathLike]) -> dict:
    """The quantization config of a saved quantized model, after checking, without reading tensor data,
    that its weights file opens and holds every quantized layer's tensors in the layout its format gives."""
    config = read_quantization_config(checkpoint_dir)
    scheme = SchemeConfig.from_dict(config["quantization"])
    where = Path(checkpoint_dir) / CONFIG_FILE
    shapes = _read_stored(checkpoint_dir, config, "cpu", lambda f, key: (tuple(f.get_slice(key).get_shape()), None))
    for name, entry in config["quantized_layers"].items():
        fmt, shape = _layer_format(name, entry, scheme, where)
        _check_layer_tensors(name, entry, fmt, shape, shapes, where)
    return config


def _build_layer(name: str, entry: dict, scheme: SchemeConfig, tensors: dict[str, torch.Tensor],
                 where: Path) -> nn.Module:
    """The quantized module of one stored layer (`where`: the config file, for errors)."""
    fmt, shape = _layer_format(name, entry, scheme, where)
    stored = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    _check_layer_tensors(name, entry, fmt, shape, stored, where)
    packed = {b: tensors[f"{name}.{b}"] for b in BUFFER_NAMES if f"{name}.{b}" in tensors}
    dtype = getattr(torch, entry["weight_dtype"])
    if entry["kind"] == "Embedding":
        return QuantizedEmbedding(*shape, fmt, packed, entry["padding_idx"], dtype)
    act = scheme.activation_format() if entry["activation_format"] is not None else None
    bias = tensors[f"{name}.bias"] if entry["bias"] else None
    return QuantizedLinear(entry["in_features"], entry["out_features"], fmt, act, packed, bias, dtype)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Compute in `dtype`: float parameters and buffers are cast and quantized layers dequantize to it,
    while packed codes and scales keep their stored dtypes (they are the scheme's numerics)."""
    for module in model.modules():
        packed = isinstance(module, (QuantizedLinear, QuantizedEmbedding))
        if packed:
            module.weight_dtype = dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_floating_point() and not (packed and name in BUFFER_NAMES):
                setattr(module, name, buffer.to(dtype))
    return model


def load_quantized(model: nn.Module, checkpoint_dir: Union[str, os.PathLike],
                   device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a saved quantized model into `model` (same architecture, float or on the meta device).
    `dtype`: the compute dtype (`set_compute_dtype`); None keeps the dtypes it was saved with."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_quantization_config(checkpoint_dir)
    scheme = SchemeConfig.from_dict(config["quantization"])
    tensors = read_quantized_tensors(checkpoint_dir, config, device)
    weights = checkpoint_dir / WEIGHTS_FILE
    quantized_keys = set()
    for name, entry in config["quantized_layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise QattuneError(f"{weights}: quantized layer {name!r} does not exist in the model; "
                               "load it into the architecture it was quantized from") from None
        layer = _build_layer(name, entry, scheme, tensors, checkpoint_dir / CONFIG_FILE)
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
    return model if dtype is None else set_compute_dtype(model, dtype)
