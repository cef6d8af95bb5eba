"""Write a GGUF file that llama.cpp can run, from converted `q4_0` / `q8_0` modules and float tensors.

The writer is model-agnostic: the caller (the model side) maps its modules to GGUF tensor names
(`blk.0.attn_q.weight`, ...) and gives the architecture's hyperparameters and the tokenizer as GGUF
metadata. Quantized layers are written as raw Q4_0 / Q8_0 blocks rebuilt from their packed codes and
float16 scales (no requantization, so the file computes exactly what qattune computed); float tensors
are written as f32, f16 or bf16 (1-D tensors, such as norms, always as f32, as llama.cpp expects).

Block layout (gguf `quants.py`, llama.cpp `ggml-quants.c`), per 32 values along a row:
Q8_0 = float16 d, 32 x int8 q; Q4_0 = float16 d, 16 bytes with q[j] in the low and q[j+16] in the
high nibble of byte j.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import gguf
import numpy as np
import torch
from torch import Tensor

from qattune.errors import QattuneError
from qattune.quant.formats import GGUFQ4_0, GGUFQ8_0
from qattune.quant.modules import QuantizedEmbedding, QuantizedLinear

GGUFTensorSource = Union[Tensor, QuantizedLinear, QuantizedEmbedding]
FloatType = Literal["f32", "f16", "bf16"]

_BLOCK = 32
_FLOAT_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}


def q8_0_blocks(codes: Tensor, d16: Tensor) -> np.ndarray:
    """Raw Q8_0 bytes `[rows, blocks * 34]` from int8 codes `[rows, K]` and float16 scales `[rows, K/32]`."""
    rows, width = codes.shape
    q = codes.to(torch.int8).reshape(rows, width // _BLOCK, _BLOCK).view(torch.uint8)
    d = d16.to(torch.float16).reshape(rows, width // _BLOCK, 1).view(torch.uint8)  # 2 bytes, little endian
    return torch.cat((d, q), dim=-1).reshape(rows, -1).numpy()


def q4_0_blocks(codes: Tensor, d16: Tensor) -> np.ndarray:
    """Raw Q4_0 bytes `[rows, blocks * 18]` from uint8 codes 0..15 `[rows, K]` and float16 scales."""
    rows, width = codes.shape
    q = codes.to(torch.uint8).reshape(rows, width // _BLOCK, _BLOCK)
    nibbles = q[..., : _BLOCK // 2] | (q[..., _BLOCK // 2 :] << 4)
    d = d16.to(torch.float16).reshape(rows, width // _BLOCK, 1).view(torch.uint8)
    return torch.cat((d, nibbles), dim=-1).reshape(rows, -1).numpy()


def _quantized_payload(
    name: str, module: Union[QuantizedLinear, QuantizedEmbedding]
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    q = module.quantized_weight()
    codes, d16 = q.codes.detach().cpu(), q.scale.detach().cpu()
    if isinstance(module.weight_format, GGUFQ4_0):
        return q4_0_blocks(codes, d16), gguf.GGMLQuantizationType.Q4_0
    if isinstance(module.weight_format, GGUFQ8_0):
        return q8_0_blocks(codes, d16), gguf.GGMLQuantizationType.Q8_0
    raise QattuneError(
        f"GGUF export: tensor {name!r} is quantized as {module.weight_format.name}, which GGUF cannot hold "
        "without requantizing; convert with scheme q4_0 or q8_0, or keep the layer in float"
    )


def _float_payload(tensor: Tensor, float_type: FloatType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if tensor.dim() <= 1 or float_type == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if float_type == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Add one key: (value, GGUFValueType[, array element GGUFValueType]) as given; else int -> uint32
    (int32 if negative), float -> float32, bool, str, list -> array (element type from the first element)."""
    if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[1], gguf.GGUFValueType):
        writer.add_key_value(key, value[0], *value[1:])
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, np.ndarray)):
        writer.add_array(key, list(value))
    else:
        raise QattuneError(f"GGUF export: metadata key {key!r} has a value of type {type(value).__name__}; "
                           "use int, float, bool, str, a list, or (value, gguf.GGUFValueType)")


def write_gguf(
    path: Union[str, os.PathLike],
    tensors: Mapping[str, GGUFTensorSource],
    architecture: str,
    metadata: Mapping[str, Any],
    tokenizer_metadata: Mapping[str, Any],
    float_type: FloatType = "f16",
) -> Path:
    """Write `tensors` ({GGUF name: converted q4_0/q8_0 module or float tensor}) with the architecture's
    metadata (e.g. `llama.block_count`) and tokenizer metadata (`tokenizer.ggml.*`) to a GGUF file."""
    if float_type not in _FLOAT_FILE_TYPES:
        raise QattuneError(f"GGUF export: float_type {float_type!r} is not one of {sorted(_FLOAT_FILE_TYPES)}")
    payloads = {}
    for name, source in tensors.items():
        if isinstance(source, (QuantizedLinear, QuantizedEmbedding)):
            payloads[name] = _quantized_payload(name, source)
        elif isinstance(source, Tensor):
            payloads[name] = _float_payload(source, float_type)
        else:
            raise QattuneError(f"GGUF export: tensor {name!r} is a {type(source).__name__}; "
                               "pass a converted QuantizedLinear/QuantizedEmbedding or a float tensor")
    kinds = {qtype for _, qtype in payloads.values()}
    file_type = (gguf.LlamaFileType.MOSTLY_Q4_0 if gguf.GGMLQuantizationType.Q4_0 in kinds
                 else gguf.LlamaFileType.MOSTLY_Q8_0 if gguf.GGMLQuantizationType.Q8_0 in kinds
                 else _FLOAT_FILE_TYPES[float_type])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in {**metadata, **tokenizer_metadata}.items():
        if key == "general.architecture":  # written by GGUFWriter itself
            if value != architecture:
                raise QattuneError(f"GGUF export: metadata general.architecture={value!r} contradicts "
                                   f"architecture={architecture!r}")
            continue
        _add_metadata(writer, key, value)
    for name, (data, qtype) in payloads.items():
        raw = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name, data, raw_dtype=qtype if raw else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
