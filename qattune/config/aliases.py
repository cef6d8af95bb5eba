"""torchtune component paths and field names, mapped onto qattune's, so a torchtune config runs as is.

One table, in one place. Each entry says which qattune component a torchtune path builds, which
arguments the torchtune class implied (e.g. the 8da4w scheme of `Int8DynActInt4WeightQATQuantizer`),
which torchtune field names are spelt differently here (`groupsize` -> `group_size`), and which fields
qattune does not need and ignores. Model and tokenizer builders follow a naming rule instead of entries:
`torchtune.models.<family>.<name>` is `qattune.models.<name>` (`qattune.tokenizers.<name>` for
`*_tokenizer`). A torchtune component with no qattune counterpart has `target=None` and a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

TORCHTUNE_PREFIX = "torchtune."


@dataclass(frozen=True)
class Alias:
    target: str | None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    renames: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    reason: str = ""

    def translate(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """torchtune-spelt keyword arguments as the qattune target takes them."""
        out = {self.renames.get(k, k): v for k, v in kwargs.items() if k not in self.ignored}
        return {**self.fixed, **out}


_CHECKPOINTER_IGNORED = ("recipe_checkpoint", "safe_serialization", "adapter_checkpoint", "should_load_recipe_state")
_LOSS_IGNORED = ("num_output_chunks", "tp_enabled", "mask_ignored_tokens")


def _quantizer(kind: str, scheme: str, *ignored: str) -> Alias:
    return Alias(f"qattune.quant.{kind}", fixed={"scheme": scheme}, renames={"groupsize": "group_size"},
                 ignored=("padding_allowed", "precision", "scales_precision", *ignored))


def _missing(reason: str) -> Alias:
    return Alias(None, reason=reason)


TORCHTUNE_COMPONENTS: dict[str, Alias] = {
    # checkpointers
    "torchtune.training.FullModelHFCheckpointer": Alias("qattune.checkpoint.HFCheckpointer", ignored=_CHECKPOINTER_IGNORED),
    "torchtune.training.FullModelMetaCheckpointer": Alias("qattune.checkpoint.MetaCheckpointer", ignored=_CHECKPOINTER_IGNORED),
    "torchtune.training.FullModelTorchTuneCheckpointer": _missing(
        "qattune reads Hugging Face, Meta and GGUF checkpoints; save the model in one of those layouts"),
    # losses
    "torchtune.modules.loss.CEWithChunkedOutputLoss": Alias("qattune.training.CrossEntropyLoss", ignored=_LOSS_IGNORED),
    "torchtune.modules.loss.LinearCrossEntropyLoss": Alias("qattune.training.CrossEntropyLoss", ignored=_LOSS_IGNORED),
    # learning-rate schedules
    "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup": Alias("qattune.training.get_cosine_schedule_with_warmup"),
    "torchtune.modules.get_cosine_schedule_with_warmup": Alias("qattune.training.get_cosine_schedule_with_warmup"),
    # metric loggers and profiler
    "torchtune.training.metric_logging.DiskLogger": Alias("qattune.training.JSONLLogger"),
    "torchtune.training.metric_logging.StdoutLogger": Alias("qattune.training.StdoutLogger"),
    "torchtune.training.metric_logging.TensorBoardLogger": Alias("qattune.training.TensorBoardLogger", ignored=("organize_logs",)),
    "torchtune.training.metric_logging.WandBLogger": _missing(
        "Weights & Biases logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger"),
    "torchtune.training.metric_logging.CometLogger": _missing(
        "Comet logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger"),
    "torchtune.training.metric_logging.MLFlowLogger": _missing(
        "MLflow logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger"),
    "torchtune.training.setup_torch_profiler": Alias("qattune.training.setup_profiler"),
    # quantizers (torchtune's names encode the scheme)
    "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer": _quantizer("QATQuantizer", "8da4w"),
    "torchtune.training.quantization.Int8DynActInt4WeightQuantizer": _quantizer("PTQQuantizer", "8da4w"),
    "torchtune.training.quantization.Int4WeightOnlyQATQuantizer": _quantizer("QATQuantizer", "4w", "inner_k_tiles"),
    "torchtune.training.quantization.Int4WeightOnlyQuantizer": _quantizer("PTQQuantizer", "4w", "inner_k_tiles"),
    # datasets and collators
    "torchtune.datasets.text_completion_dataset": Alias("qattune.data.text_completion_dataset"),
    "torchtune.datasets.instruct_dataset": Alias("qattune.data.instruct_dataset"),
    "torchtune.datasets.chat_dataset": Alias("qattune.data.chat_dataset"),
    "torchtune.datasets.alpaca_cleaned_dataset": Alias("qattune.data.alpaca_cleaned_dataset"),
    "torchtune.datasets.alpaca_dataset": Alias("qattune.data.alpaca_dataset"),
    "torchtune.data.padded_collate_sft": Alias("qattune.data.padded_collate"),
    "torchtune.data.padded_collate_packed": Alias("qattune.data.padded_collate"),
}


def torchtune_alias(path: str) -> Alias | None:
    """The mapping for a `torchtune.*` component path, or None when `path` is not torchtune's."""
    if not path.startswith(TORCHTUNE_PREFIX):
        return None
    if path in TORCHTUNE_COMPONENTS:
        return TORCHTUNE_COMPONENTS[path]
    parts = path.split(".")
    if len(parts) == 4 and parts[1] == "models":
        name = parts[3]
        package = "tokenizers" if name.endswith("_tokenizer") else "models"
        return Alias(f"qattune.{package}.{name}")
    return _missing("it is not in qattune's torchtune mapping (qattune/config/aliases.py); use a qattune component")
