"""Hugging Face checkpoints: config.json + model.safetensors, or shards + model.safetensors.index.json.

Reading takes the files the index names (or `checkpoint_files`); writing produces the same layout,
sharded above `max_shard_size`, with a config.json and the tokenizer files of the source folder, so
`transformers.AutoModelForCausalLM.from_pretrained(step_dir)` loads what qattune saves.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qattune.checkpoint.base import Checkpointer
from qattune.errors import QattuneError
from qattune.models.adapters import StateDictAdapter
from qattune.models.transformer import TransformerConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files a Hugging Face model folder carries besides weights and config; copied into every saved checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "original/tokenizer.model",
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: Union[int, str]) -> int:
    """Bytes in "5GB" (10^9), "500MiB" (2^20) or a plain integer."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise QattuneError(f"max_shard_size '{size}' is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def read_json(path: Path, needed_by: str = "a Hugging Face checkpoint folder") -> dict[str, Any]:
    """A JSON file as a dict; a missing or broken file is one QattuneError line."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise QattuneError(f"{path} not found; {needed_by} needs it") from None
    except json.JSONDecodeError as err:
        raise QattuneError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: TransformerConfig,
    adapter: StateDictAdapter,
    out_dir: Path,
    max_shard_bytes: int,
    base_config: Optional[Mapping[str, Any]] = None,
    source_dir: Optional[Path] = None,
) -> None:
    """Write `state_dict` (qattune names) as a Hugging Face folder into `out_dir`."""
    tensors = {k: v.contiguous().cpu() for k, v in adapter.to_hf(state_dict, config).items()}
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, out_dir / SINGLE_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in names}, out_dir / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, filename))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    write_json(out_dir / "config.json", adapter.config_to_hf(config, dtype, base_config))
    if source_dir is not None and source_dir.is_dir():
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source_dir / name, out_dir / name)


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each under `max_bytes` (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class HFCheckpointer(Checkpointer):
    """Read and write Hugging Face model folders (safetensors, single or sharded with an index)."""

    format = "hf"
    format_name = "config.json"

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[list[str], dict[str, str], None] = None,
        model_type: Optional[str] = None,
        output_dir: Optional[str] = None,
        max_shard_size: str = "5GB",
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
    ) -> None:
        super().__init__(
            checkpoint_dir, checkpoint_files, model_type, output_dir, recipe_checkpoint, resume_from_checkpoint
        )
        if not self.checkpoint_dir.is_dir():
            raise QattuneError(f"checkpoint_dir must be a folder with config.json: {self.checkpoint_dir}")
        if not safe_serialization:
            raise QattuneError("safe_serialization: false is not supported; qattune always writes safetensors")
        self.max_shard_bytes = parse_size(max_shard_size)
        self._hf_config: Optional[dict[str, Any]] = None

    @property
    def hf_config(self) -> dict[str, Any]:
        if self._hf_config is None:
            self._hf_config = read_json(self.checkpoint_dir / "config.json")
        return self._hf_config

    def _detect_model_type(self) -> str:
        model_type = self.hf_config.get("model_type")
        if not model_type:
            raise QattuneError(f"{self.checkpoint_dir / 'config.json'} has no model_type; set model_type in the config")
        return model_type

    def _read_config(self) -> TransformerConfig:
        return self.adapter.config_from_hf(self.hf_config, str(self.checkpoint_dir / "config.json"))

    def weight_files(self) -> list[Path]:
        """The safetensors files to read: `checkpoint_files`, else the index's, else model.safetensors / *."""
        index_path = self.checkpoint_dir / INDEX_NAME
        if self.checkpoint_files is not None:
            names, listed_in = self.checkpoint_files, "checkpoint_files"
        elif index_path.is_file():
            names = sorted(set(read_json(index_path).get("weight_map", {}).values()))
            listed_in = INDEX_NAME
        elif (self.checkpoint_dir / SINGLE_NAME).is_file():
            names, listed_in = [SINGLE_NAME], ""
        else:
            names = sorted(p.name for p in self.checkpoint_dir.glob("*.safetensors"))
            listed_in = ""
            if not names:
                raise QattuneError(
                    f"no *.safetensors file in {self.checkpoint_dir}; is this a Hugging Face model folder?"
                )
        paths = [self.checkpoint_dir / n for n in names]
        for path in paths:
            if not path.is_file():
                raise QattuneError(
                    f"checkpoint shard '{path.name}' listed in {listed_in} is missing from {self.checkpoint_dir}; "
                    "download the complete checkpoint"
                )
        return paths

    def _read_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for path in self.weight_files():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        tensors[key] = f.get_tensor(key)
            except Exception as err:  # safetensors raises its own SafetensorError for corrupt files
                raise QattuneError(f"cannot read safetensors file {path}: {str(err).splitlines()[0]}") from None
        return tensors

    def _write(self, state_dict: dict[str, torch.Tensor], config: TransformerConfig, out_dir: Path) -> None:
        write_hf_checkpoint(
            state_dict, config, self.adapter, out_dir, self.max_shard_bytes, self.hf_config, self.checkpoint_dir
        )
