"""What every checkpointer shares: the constructor fields, `load()`, `save()`, and the shape checks.

A checkpointer reads one on-disk format and hands qattune a state dict in qattune's names plus the model
config (`load() -> (state_dict, config_dict)`, `config_dict` being the keyword arguments of
`qattune.models.llama`); `save(state_dict, step_dir)` writes a checkpoint atomically. Subclasses implement
`_read_config()` (cheap: no tensors) and `_read_tensors()`; the base class converts names through the
family's state-dict adapter and checks every shape against the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

from qattune.errors import QattuneError
from qattune.models.adapters import StateDictAdapter, get_adapter
from qattune.models.transformer import Transformer, TransformerConfig

ExtraWriter = Callable[[Path], None]


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """qattune name -> shape of every tensor of a model with `config` (built on meta: instant)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


class Checkpointer(ABC):
    """Base of HFCheckpointer, MetaCheckpointer and GGUFCheckpointer.

    checkpoint_dir: folder (or file, for GGUF) to read. checkpoint_files: files inside it (default: what
    the folder's index/layout says). model_type: family, e.g. "llama3_2", "qwen2_5" (default: from the
    checkpoint's own config). output_dir: where `save(sd, "step_N")` writes. The remaining fields are
    torchtune's, accepted at their defaults only: a run resumes from the recipe's top-level
    `resume_from_checkpoint` (the `recipe_state.pt` inside an `output_dir/step_N` folder).
    """

    format: str = ""
    format_name: str = ""

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[list[str], dict[str, str], None] = None,
        model_type: Optional[str] = None,
        output_dir: Optional[str] = None,
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
    ) -> None:
        if recipe_checkpoint is not None or resume_from_checkpoint:
            given = (f"recipe_checkpoint={recipe_checkpoint}" if recipe_checkpoint is not None
                     else "resume_from_checkpoint=true")
            raise QattuneError(f"checkpointer {given}: a run resumes from the top-level resume_from_checkpoint "
                               "(true, or an output_dir/step_N folder); set that and remove this argument")
        self.checkpoint_dir = Path(checkpoint_dir).expanduser()
        self.checkpoint_files = _expand_files(checkpoint_files)
        self.output_dir = Path(output_dir).expanduser() if output_dir is not None else None
        self._model_type = model_type
        self._adapter: Optional[StateDictAdapter] = get_adapter(model_type) if model_type else None
        self._config: Optional[TransformerConfig] = None
        if not self.checkpoint_dir.exists():
            raise QattuneError(f"checkpoint_dir does not exist: {self.checkpoint_dir}")

    # --- what subclasses provide ----------------------------------------------------------------------
    @abstractmethod
    def _detect_model_type(self) -> str:
        """The model type the checkpoint itself declares (config.json's model_type, GGUF's architecture)."""

    @abstractmethod
    def _read_config(self) -> TransformerConfig:
        """The model config, without reading tensor data."""

    @abstractmethod
    def _read_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors, in this format's names and layout."""

    @abstractmethod
    def _write(self, state_dict: dict[str, torch.Tensor], config: TransformerConfig, out_dir: Path) -> None:
        """Write a checkpoint into the (temporary, empty) folder `out_dir`."""

    # --- public API -----------------------------------------------------------------------------------
    @property
    def adapter(self) -> StateDictAdapter:
        if self._adapter is None:
            self._adapter = get_adapter(self._detect_model_type())
        return self._adapter

    @property
    def config(self) -> TransformerConfig:
        """The checkpoint's model config (read once, no tensor data)."""
        if self._config is None:
            self._config = self._read_config()
        return self._config

    def model_config(self) -> dict[str, Any]:
        """The config as keyword arguments of `qattune.models.llama`."""
        return self.config.to_dict()

    def describe(self) -> str:
        return str(self.checkpoint_dir)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state dict in qattune names and layout, model config dict). Tensors stay in the stored dtype."""
        config = self.config
        theirs = self._read_tensors()
        ours = self.adapter.from_format(self.format, theirs, config, self.describe())
        self._check_shapes(ours, config)
        return ours, config.to_dict()

    def save(
        self,
        state_dict: Mapping[str, torch.Tensor],
        step_dir: Union[str, Path],
        *,
        config: Union[TransformerConfig, Mapping[str, Any], None] = None,
        write_extra: Optional[ExtraWriter] = None,
    ) -> Path:
        """Write `state_dict` (qattune names) to `step_dir` atomically; return the final path.

        A relative `step_dir` is placed under `output_dir`. `config` defaults to the loaded checkpoint's.
        `write_extra(tmp_dir)` may add files (e.g. recipe state) inside the same atomic write.
        """
        from qattune.checkpoint.atomic import atomic_directory

        if isinstance(config, Mapping):
            config = TransformerConfig(**config)
        config = config or self.config
        final = Path(step_dir)
        if not final.is_absolute() and self.output_dir is not None:
            final = self.output_dir / final
        tensors = {k: v.detach() for k, v in state_dict.items()}
        if config.tie_embeddings:
            tensors.pop("output.weight", None)  # the embedding, under a second name
        self._check_shapes(tensors, config, saving=True)
        with atomic_directory(final) as tmp:
            self._write(tensors, config, tmp)
            if write_extra is not None:
                write_extra(tmp)
        return final

    # --- checks ---------------------------------------------------------------------------------------
    def _check_shapes(
        self, state_dict: Mapping[str, torch.Tensor], config: TransformerConfig, saving: bool = False
    ) -> None:
        expected = expected_shapes(config)
        names = self.adapter.names(self.format, config)
        unknown = [name for name in state_dict if name not in expected]
        if unknown:
            raise QattuneError(f"unexpected tensor '{unknown[0]}' for a model with this config")
        for name, want in expected.items():  # model order: the first mismatch reported is the earliest
            tensor = state_dict.get(name)
            if tensor is None:
                continue
            if tuple(tensor.shape) != want:
                if saving:
                    raise QattuneError(
                        f"cannot save: tensor '{name}' has shape {_shape(tensor.shape)} but the model config "
                        f"gives {_shape(want)}"
                    )
                raise QattuneError(
                    f"{self.describe()}: tensor '{names.get(name, name)}' has shape {_shape(tensor.shape)} but "
                    f"{self.format_name} implies {_shape(want)}; the config does not match the weights"
                )


def _expand_files(files: Union[list[str], dict[str, str], None]) -> Optional[list[str]]:
    """torchtune also accepts {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00004"}."""
    if files is None or isinstance(files, (list, tuple)):
        return list(files) if files is not None else None
    try:
        fmt, last = files["filename_format"], files["max_filename"]
    except (KeyError, TypeError):
        raise QattuneError(
            "checkpoint_files must be a list of file names or {filename_format: ..., max_filename: ...}"
        ) from None
    width = len(str(last))
    return [fmt.format(str(i).zfill(width), last) for i in range(1, int(last) + 1)]
