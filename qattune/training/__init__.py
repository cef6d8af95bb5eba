"""qattune.training: the one training loop and its parts (loss, optimizer, LR, hooks, logging, FSDP2)."""

from .blocks import (
    apply_activation_checkpointing,
    compile_blocks,
    shard_model,
    shard_model_from_rank0,
    transformer_blocks,
)
from .checkpoint_dirs import RECIPE_STATE_FILE, latest_checkpoint, list_step_dirs
from .distributed import (
    DistInfo,
    all_reduce_sum,
    destroy_distributed,
    gather_full_state_dict,
    init_distributed,
    load_full_state_dict,
)
from .hooks import FakeQuantAfterNSteps, RoundingAtStep, StepHook, fake_quant_enabled_at
from .loss import CrossEntropyLoss, DistillationLoss
from .lr_schedule import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
from .memory import peak_memory_stats
from .metric_logging import JSONLLogger, StdoutLogger, TensorBoardLogger
from .optim import AdamW
from .precision import resolve_dtype
from .profiler import setup_profiler
from .trainer import Trainer, num_training_steps

__all__ = [
    "AdamW",
    "CrossEntropyLoss",
    "DistInfo",
    "DistillationLoss",
    "FakeQuantAfterNSteps",
    "JSONLLogger",
    "RECIPE_STATE_FILE",
    "RoundingAtStep",
    "StdoutLogger",
    "StepHook",
    "TensorBoardLogger",
    "Trainer",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "compile_blocks",
    "destroy_distributed",
    "fake_quant_enabled_at",
    "gather_full_state_dict",
    "get_cosine_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "init_distributed",
    "latest_checkpoint",
    "list_step_dirs",
    "load_full_state_dict",
    "num_training_steps",
    "peak_memory_stats",
    "resolve_dtype",
    "setup_profiler",
    "shard_model",
    "shard_model_from_rank0",
    "transformer_blocks",
]
