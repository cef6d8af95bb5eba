"""torchtune component paths and field names, mapped onto qattune's, so a torchtune config runs as is.

One table, in one place. Each entry says which qattune component a torchtune path builds, which
arguments the torchtune class implies (`fixed`: the 8da4w scheme of `Int8DynActInt4WeightQATQuantizer`),
torchtune's default where qattune's differs (`defaults`: its group size 256), which torchtune field names
are spelt differently here (`groupsize` -> `group_size`), which fields qattune does not need and ignores,
and which it accepts only with the value that means what qattune does (`only`: `safe_serialization:
true`), refusing any other value with the reason and what to write instead. Model and tokenizer builders
follow a naming rule instead of entries: `torchtune.models.<family>.<name>` is `qattune.models.<name>`
(`qattune.tokenizers.<name>` for `*_tokenizer`; `qlora_<name>` is `lora_<name>` with an NF4 base, as in
torchtune). A torchtune component with no qattune counterpart has `target=None` and a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from qattune.errors import QattuneError

TORCHTUNE_PREFIX = "torchtune."
COMPONENT_KEY = "_component_"
_PLAIN = (str, bool, int, float, list, dict, type(None))


def _shown(value: Any) -> str:
    """A value as YAML spells it (true, null, 8da4w)."""
    return value if isinstance(value, str) else json.dumps(value)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # so that 0 is not false and 1 is not true


class RefusedArgument(QattuneError):
    """A torchtune argument whose value qattune cannot honour; `argument` names it, the message says why."""

    def __init__(self, argument: str, value: Any, reason: str) -> None:
        super().__init__(f"{argument}={_shown(value)}: {reason}")
        self.argument = argument


@dataclass(frozen=True)
class Only:
    """An argument accepted only with one of `values` (then dropped: qattune does what that value means);
    any other value is refused with `reason`."""

    values: tuple[Any, ...]
    reason: str


@dataclass(frozen=True)
class Alias:
    target: str | None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    renames: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    only: Mapping[str, Only] = field(default_factory=dict)
    reason: str = ""

    def translate(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """torchtune-spelt keyword arguments as the qattune target takes them; raises `RefusedArgument`
        for a value qattune cannot honour."""
        refused = self.refusals(kwargs)
        if refused:
            raise refused[0]
        out = {self.renames.get(k, k): v for k, v in kwargs.items() if k not in self.ignored and k not in self.only}
        return {**self.defaults, **out, **self.fixed}

    def refusals(self, kwargs: Mapping[str, Any]) -> list[RefusedArgument]:
        """Every argument whose value qattune cannot honour (a value not known yet, e.g. an unresolved
        interpolation while validating, is not refused)."""
        found = []
        for key, value in kwargs.items():
            name = self.renames.get(key, key)
            if not isinstance(value, _PLAIN):
                continue
            if key in self.only and not any(_same(value, v) for v in self.only[key].values):
                found.append(RefusedArgument(key, value, self.only[key].reason))
            elif name in self.fixed and not _same(value, self.fixed[name]):
                found.append(RefusedArgument(key, value, f"this torchtune component means {name}="
                                             f"{_shown(self.fixed[name])}; remove {key}, or use {self.target}"))
        return found

    def spelling(self, name: str) -> str:
        """The torchtune name of the target's argument `name` (`group_size` -> `groupsize`)."""
        return next((theirs for theirs, ours in self.renames.items() if ours == name), name)


def _missing(reason: str) -> Alias:
    return Alias(None, reason=reason)


_RESUME = "the top-level resume_from_checkpoint: true (output_dir's latest step_N) or a step_N folder"
_CHECKPOINTER_ONLY = {  # torchtune checkpointer fields that qattune's checkpointers do not take
    "recipe_checkpoint": Only((None,), f"qattune resumes from the recipe_state.pt inside a step folder: set {_RESUME}, "
                                       "and remove recipe_checkpoint"),
    "adapter_checkpoint": Only((None,), f"qattune resumes LoRA adapters from adapter/ inside a step folder: set "
                                        f"{_RESUME}, and remove adapter_checkpoint"),
    "should_load_recipe_state": Only((False,), f"to resume, set {_RESUME}, and remove should_load_recipe_state"),
    "resume_from_checkpoint": Only((False,), "qattune's recipes read resume_from_checkpoint at the top level; "
                                             "move it there"),
    "keep_last_n_checkpoints": Only((None,), "qattune prunes step folders with the top-level keep_last_n_checkpoints; "
                                             "move it there"),
    "enable_dcp": Only((False,), "qattune does not write torch.distributed.checkpoint (DCP) folders: rank 0 writes "
                                 "safetensors in the Hugging Face layout; remove enable_dcp"),
}
_HF_CHECKPOINTER = Alias("qattune.checkpoint.HFCheckpointer", only={**_CHECKPOINTER_ONLY, "safe_serialization": Only(
    (True,), "qattune always writes safetensors (torchtune's safe_serialization: true); remove safe_serialization")})
_META_CHECKPOINTER = Alias("qattune.checkpoint.MetaCheckpointer", only=_CHECKPOINTER_ONLY)
_TORCHTUNE_CHECKPOINTER = _missing(
    "qattune reads Hugging Face, Meta and GGUF checkpoints; save the model in one of those layouts")
_LOSS_IGNORED = ("num_output_chunks", "tp_enabled", "mask_ignored_tokens")


def _quantizer(kind: str, scheme: str, groupsize: int, *ignored: str) -> Alias:
    """A torchtune/torchao quantizer: its class fixes the scheme; `groupsize` is its default group size."""
    return Alias(f"qattune.quant.{kind}", fixed={"scheme": scheme}, defaults={"group_size": groupsize},
                 renames={"groupsize": "group_size"},
                 ignored=("padding_allowed", "precision", "scales_precision", *ignored))


# torchao's quantizers (torchtune's QAT ones, and its PTQ ones before 0.3) default to groupsize=256;
# torchtune's own Int4WeightOnlyQuantizer (torchtune.training.quantization) to 128.
_QAT_8DA4W = _quantizer("QATQuantizer", "8da4w", 256)
_QAT_4W = _quantizer("QATQuantizer", "4w", 256, "inner_k_tiles")
_PTQ_8DA4W = _quantizer("PTQQuantizer", "8da4w", 256)
_COSINE = Alias("qattune.training.get_cosine_schedule_with_warmup", only={"last_epoch": Only(
    (-1,), "qattune restores the schedule's position from recipe_state.pt when it resumes (resume_from_checkpoint); "
           "remove last_epoch")})
# torchtune's setup_torch_profiler fills in this schedule (after the first steps' one-off costs) and shapes
_PROFILER = Alias("qattune.training.setup_profiler",
                  defaults={"wait_steps": 5, "warmup_steps": 5, "active_steps": 2, "record_shapes": True})
_LOGGERS = {
    "DiskLogger": Alias("qattune.training.JSONLLogger"),
    "StdoutLogger": Alias("qattune.training.StdoutLogger"),
    "TensorBoardLogger": Alias("qattune.training.TensorBoardLogger", defaults={"organize_logs": True}),
    "WandBLogger": _missing("Weights & Biases logging is not part of qattune; use qattune.training.JSONLLogger or "
                            "TensorBoardLogger"),
}

_TORCHTUNE_ALPACA = {"template": "alpaca_chat", "torchtune_layout": True}
# torchtune's chat datasets mask whole messages and end with the tokenizer's eos (torchtune_layout); 0.6.1 has
# no masking_strategy (later torchtune's train_on_all / train_on_assistant are train_on_input true / false)
_TORCHTUNE_CHAT_ONLY = {"masking_strategy": Only((None,), (
    "torchtune 0.6.1 (what qattune reproduces) has no masking_strategy; write train_on_input: true for "
    "train_on_all or false for train_on_assistant (train_on_last is not reproduced), and remove masking_strategy"))}
_TORCHTUNE_CHAT = Alias("qattune.data.chat_dataset", fixed={"torchtune_layout": True}, only=_TORCHTUNE_CHAT_ONLY)
_TORCHTUNE_INSTRUCT = Alias("qattune.data.input_output_dataset", fixed={"torchtune_layout": True},
                            only=_TORCHTUNE_CHAT_ONLY)


TORCHTUNE_COMPONENTS: dict[str, Alias] = {
    # checkpointers
    "torchtune.training.FullModelHFCheckpointer": _HF_CHECKPOINTER,
    "torchtune.training.FullModelMetaCheckpointer": _META_CHECKPOINTER,
    "torchtune.training.FullModelTorchTuneCheckpointer": _TORCHTUNE_CHECKPOINTER,
    # losses
    "torchtune.modules.loss.CEWithChunkedOutputLoss": Alias("qattune.training.CrossEntropyLoss", ignored=_LOSS_IGNORED),
    "torchtune.modules.loss.LinearCrossEntropyLoss": Alias("qattune.training.CrossEntropyLoss", ignored=_LOSS_IGNORED),
    # learning-rate schedules
    "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup": _COSINE,
    "torchtune.modules.get_cosine_schedule_with_warmup": _COSINE,
    # metric loggers and profiler
    **{f"torchtune.training.metric_logging.{name}": alias for name, alias in _LOGGERS.items()},
    "torchtune.training.metric_logging.CometLogger": _missing(
        "Comet logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger"),
    "torchtune.training.metric_logging.MLFlowLogger": _missing(
        "MLflow logging is not part of qattune; use qattune.training.JSONLLogger or TensorBoardLogger"),
    "torchtune.training.setup_torch_profiler": _PROFILER,
    # quantizers (torchtune's names encode the scheme; *ModuleSwap are torchtune's old names of the same classes)
    "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer": _QAT_8DA4W,
    "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizerModuleSwap": _QAT_8DA4W,
    "torchtune.training.quantization.Int8DynActInt4WeightQuantizer": _PTQ_8DA4W,
    "torchtune.training.quantization.Int4WeightOnlyQATQuantizer": _QAT_4W,
    "torchtune.training.quantization.Int4WeightOnlyQATQuantizerModuleSwap": _QAT_4W,
    "torchtune.training.quantization.Int4WeightOnlyQuantizer": _quantizer("PTQQuantizer", "4w", 128, "inner_k_tiles"),
    # torchtune <= 0.2 (2024 configs) kept these in torchtune.utils
    "torchtune.utils.FullModelHFCheckpointer": _HF_CHECKPOINTER,
    "torchtune.utils.FullModelMetaCheckpointer": _META_CHECKPOINTER,
    "torchtune.utils.FullModelTorchTuneCheckpointer": _TORCHTUNE_CHECKPOINTER,
    **{f"torchtune.utils.metric_logging.{name}": alias for name, alias in _LOGGERS.items()},
    "torchtune.utils.setup_torch_profiler": _PROFILER,
    "torchtune.utils.quantization.Int8DynActInt4WeightQATQuantizer": _QAT_8DA4W,
    "torchtune.utils.quantization.Int8DynActInt4WeightQuantizer": _PTQ_8DA4W,
    "torchtune.utils.quantization.Int4WeightOnlyQATQuantizer": _QAT_4W,
    "torchtune.utils.quantization.Int4WeightOnlyQuantizer": _quantizer(
        "PTQQuantizer", "4w", 256, "inner_k_tiles", "device"),
    # datasets and collators
    "torchtune.datasets.text_completion_dataset": Alias("qattune.data.text_completion_dataset"),
    # torchtune's instruct_dataset is input -> user, output -> assistant (qattune's instruct_dataset is alpaca style)
    "torchtune.datasets.instruct_dataset": _TORCHTUNE_INSTRUCT,
    "torchtune.datasets.chat_dataset": _TORCHTUNE_CHAT,
    # torchtune's alpaca builders send the Alpaca prompt through the chat template as a user message
    "torchtune.datasets.alpaca_cleaned_dataset": Alias("qattune.data.alpaca_cleaned_dataset", fixed=_TORCHTUNE_ALPACA),
    "torchtune.datasets.alpaca_dataset": Alias("qattune.data.alpaca_dataset", fixed=_TORCHTUNE_ALPACA),
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
        return _builder_alias(parts[3])
    return _missing("it is not in qattune's torchtune mapping (qattune/config/aliases.py); use a qattune component")


def _builder_alias(name: str) -> Alias:
    """The naming rule for `torchtune.models.<family>.<name>`."""
    if name.endswith("_tokenizer"):
        return _tokenizer_alias(name)
    if name.startswith("qlora_"):  # torchtune: qlora_X = partial(lora_X, quantize_base=True)
        return Alias(f"qattune.models.{name[1:]}", fixed={"quantize_base": True})
    return Alias(f"qattune.models.{name}")


# torchtune's llama2_tokenizer applies Llama2ChatTemplate unless told otherwise (prompt_template: null
# means no template there); its other tokenizers lay out chat in their own format with no template.
_OWN_TEMPLATE = {"llama2_tokenizer": "torchtune.models.llama2.Llama2ChatTemplate"}
_TEMPLATE_REASON = ("qattune applies no torchtune prompt template: a conversation is laid out in the tokenizer's "
                    "own chat format (qattune/tokenizers/chat_format.py), as torchtune's {name} does with "
                    "prompt_template: {own}; remove prompt_template")


def _tokenizer_alias(name: str) -> Alias:
    own = _OWN_TEMPLATE.get(name)
    return Alias(f"qattune.tokenizers.{name}", only={
        "prompt_template": Only((own,), _TEMPLATE_REASON.format(name=name, own=_shown(own))),
        "truncation_type": Only(("right",), "qattune truncates on the right (keeps a sequence's first max_seq_len "
                                            "tokens); remove truncation_type"),
    })


def component_argument(node: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """The value a `_component_` node passes as its target's argument `name`, torchtune spellings and the
    values a torchtune path implies included (`quantize_base` of a `qlora_*` builder)."""
    kwargs = {k: v for k, v in node.items() if k not in (COMPONENT_KEY, "_partial_")}
    alias = torchtune_alias(str(node.get(COMPONENT_KEY, "")))
    if alias is not None and alias.target is not None:
        kwargs = alias.translate(kwargs)
    return kwargs.get(name, default)
