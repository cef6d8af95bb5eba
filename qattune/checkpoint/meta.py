"""Meta's reference checkpoints: `consolidated.NN.pth` (model-parallel shards) + params.json.

Several `consolidated.*.pth` files are model-parallel slices and are joined along each weight's split
dimension. Writing produces one `consolidated.00.pth`, params.json, and the source tokenizer.model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from qattune.checkpoint.base import Checkpointer
from qattune.checkpoint.hf import read_json, write_json
from qattune.errors import QattuneError
from qattune.models.transformer import TransformerConfig

# Model-parallel split dimension of each Meta weight (by name suffix); anything else is replicated.
_ROW_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")  # fmt: skip
_COLUMN_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")


def _merge_model_parallel(shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return shards[0]
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        if name.endswith(_ROW_SPLIT):
            merged[name] = torch.cat(parts, dim=0)
        elif name.endswith(_COLUMN_SPLIT):
            merged[name] = torch.cat(parts, dim=1)
        elif name == "tok_embeddings.weight":
            # Llama 2 split the embedding width, Llama 3 the vocabulary.
            merged[name] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        else:
            merged[name] = parts[0]
    return merged


class MetaCheckpointer(Checkpointer):
    """Read and write Meta-format checkpoints (consolidated.*.pth + params.json)."""

    format = "meta"
    format_name = "params.json"

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[list[str], dict[str, str], None] = None,
        model_type: Optional[str] = None,
        output_dir: Optional[str] = None,
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            checkpoint_dir, checkpoint_files, model_type, output_dir, recipe_checkpoint, resume_from_checkpoint
        )
        self._tensors: Optional[dict[str, torch.Tensor]] = None

    def _detect_model_type(self) -> str:
        """params.json does not name the family: Llama 3.2 1B/3B are the tied Llama 3 checkpoints.

        Their params.json says `use_scaled_rope` and means factor 32, where Llama 3.1 means 8.
        """
        params = read_json(self.checkpoint_dir / "params.json", "a Meta checkpoint")
        if params.get("use_scaled_rope") and "rope_scaling_factor" not in params and self._tied_embeddings():
            return "llama3_2"
        return "llama"

    def _tied_embeddings(self) -> bool:
        tensors = self._read_tensors()  # memory-mapped: only the embedding and head are touched here
        embedding = tensors.get("tok_embeddings.weight")
        if embedding is None:
            raise QattuneError(f"{self.describe()}: tensor 'tok_embeddings.weight' is missing")
        head = tensors.get("output.weight")
        return head is None or (head.shape == embedding.shape and torch.equal(head, embedding))

    def weight_files(self) -> list[Path]:
        names = self.checkpoint_files or sorted(p.name for p in self.checkpoint_dir.glob("consolidated.*.pth"))
        if not names:
            raise QattuneError(f"no consolidated.*.pth file in {self.checkpoint_dir}; is this a Meta checkpoint?")
        paths = [self.checkpoint_dir / n for n in names]
        for path in paths:
            if not path.is_file():
                raise QattuneError(f"checkpoint shard '{path.name}' is missing from {self.checkpoint_dir}")
        return paths

    def _read_tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            params = read_json(self.checkpoint_dir / "params.json", "a Meta checkpoint")
            shards = []
            for path in self.weight_files():
                try:
                    shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
                except Exception as err:
                    raise QattuneError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
            self._tensors = _merge_model_parallel(shards, int(params.get("dim", 0)))
        return self._tensors

    def _read_config(self) -> TransformerConfig:
        params = read_json(self.checkpoint_dir / "params.json", "a Meta checkpoint")
        tied = self._tied_embeddings()
        vocab_size = self._read_tensors()["tok_embeddings.weight"].shape[0]
        return self.adapter.config_from_meta(params, vocab_size, tied, str(self.checkpoint_dir / "params.json"))

    def load(self) -> tuple[dict[str, torch.Tensor], dict]:
        try:
            return super().load()
        finally:
            self._tensors = None  # do not keep the mapping alive after handing the tensors over

    def _write(self, state_dict: dict[str, torch.Tensor], config: TransformerConfig, out_dir: Path) -> None:
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter.to_meta(state_dict, config).items()}
        torch.save(tensors, out_dir / "consolidated.00.pth")
        write_json(out_dir / "params.json", self.adapter.config_to_meta(config))
        if (self.checkpoint_dir / "tokenizer.model").is_file():
            shutil.copy2(self.checkpoint_dir / "tokenizer.model", out_dir / "tokenizer.model")
