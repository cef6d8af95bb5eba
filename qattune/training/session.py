"""Everything a training recipe wires, built from its config: the keys all training recipes share.

A recipe creates a `TrainingSession` from its config, changes the model where it differs from the
others (a quantizer's `prepare`, LoRA adapters), then calls `train()`. The session builds the
process group, device and dtype, tokenizer, model (from a checkpoint or freshly initialised), data,
optimizer, LR schedule, loss, logging and the `Trainer`, and saves checkpoints in the Hugging Face
layout through the config's checkpointer. Nothing in it is specific to one recipe.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import nn

from qattune.config import Component, RecipeConfig, Unsupported, instantiate
from qattune.errors import QattuneError
from qattune.training.hooks import RoundingAtStep

log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "qattune_training.json"
EXTRA_STATE_FILE = "extra_state.safetensors"
"""Model state beyond the plain model's (e.g. learned quantization ranges), saved beside the HF files."""


PADDED_COLLATES = ("qattune.data.padded_collate", "torchtune.data.padded_collate_sft",
                   "torchtune.data.padded_collate_packed")
_SELECTIVE_AC = "selective activation checkpointing is not available; use enable_activation_checkpointing=true"


class TrainingConfig(RecipeConfig):
    """Config keys every training recipe reads (torchtune's names, so its configs run unchanged)."""

    output_dir: str
    model: Component
    tokenizer: Component
    checkpointer: Optional[Component] = None  # None: train a freshly initialised model (tiny configs)
    resume_from_checkpoint: Union[bool, str] = False  # true: the latest output_dir/step_N; or a step dir
    overwrite_output_dir: bool = False  # a fresh run into a folder of checkpoints removes them (else refused)
    dataset: Component("tokenizer")
    dataset_val: Optional[Component("tokenizer")] = None
    seed: Optional[int] = None
    shuffle: bool = True
    batch_size: int = 1
    batch_size_val: Optional[int] = None
    optimizer: Component("params")
    lr_scheduler: Optional[Component("optimizer", "num_training_steps")] = None
    loss: Optional[Component] = None
    epochs: int = 1
    max_steps_per_epoch: Optional[int] = None
    gradient_accumulation_steps: int = 1
    clip_grad_norm: Optional[float] = None
    device: Optional[str] = None  # cuda / cpu / mps; default: the best available
    dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "bf16"
    compile: bool = False
    enable_activation_checkpointing: bool = False
    enable_activation_offloading: Unsupported("use enable_activation_checkpointing to save memory; set it to false") = False
    optimizer_in_bwd: Unsupported("qattune steps the optimizer after backward; set optimizer_in_bwd=false") = False
    fsdp_cpu_offload: Unsupported("qattune does not offload FSDP parameters to CPU; set fsdp_cpu_offload=false") = False
    custom_sharded_layers: Optional[list[str]] = None  # accepted for torchtune configs; every block is sharded
    memory_efficient_fsdp_wrap: bool = False  # accepted for torchtune configs; every block is sharded
    fsdp_reshard_after_forward: bool = True  # false: keep each block's gathered weights for its backward
    fsdp_sharding_strategy: Unsupported("FSDP2 shards parameters, gradients and optimizer state (FULL_SHARD); "
                                        "remove the key", accept=(None, "FULL_SHARD")) = None
    ac_mode: Unsupported(_SELECTIVE_AC, accept=(None,)) = None  # torchtune's selective checkpointing
    ac_option: Unsupported(_SELECTIVE_AC, accept=(None,)) = None
    activation_offloading_use_streams: bool = True  # accepted for torchtune configs (no offloading here)
    cudnn_deterministic_mode: bool = False  # torch.backends.cudnn.deterministic (CUDA)
    collate_fn: Unsupported("batches go through qattune.data.padded_collate (padded and packed data alike); "
                            "remove the key", accept=(None, *PADDED_COLLATES)) = None
    save_every_n_steps: Optional[int] = None
    keep_last_n_checkpoints: Optional[int] = None
    run_val_every_n_steps: Optional[int] = None
    max_val_batches: Optional[int] = None
    metric_logger: Optional[Component] = None
    log_every_n_steps: int = 1
    log_peak_memory_stats: bool = True
    log_level: Optional[str] = None
    profiler: Optional[Component] = None
    progress_bar: bool = True


_AT_LEAST_ONE = ("batch_size", "batch_size_val", "epochs", "gradient_accumulation_steps", "max_steps_per_epoch",
                 "save_every_n_steps", "keep_last_n_checkpoints", "run_val_every_n_steps", "max_val_batches",
                 "log_every_n_steps")


def _check_numbers(cfg: Any) -> None:
    """Counts that must be at least 1 (when set), a positive clip norm, and validation with data to
    validate on: one line naming the key, before anything is built."""
    for key in _AT_LEAST_ONE:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise QattuneError(f"{key}={value}: must be a whole number of at least 1 (or null where it may be unset)")
    clip = cfg.get("clip_grad_norm")
    if clip is not None and not clip > 0:
        raise QattuneError(f"clip_grad_norm={clip}: must be positive (a negative norm would flip the gradients); "
                           "null turns clipping off")
    if cfg.get("run_val_every_n_steps") and cfg.get("dataset_val") is None:
        raise QattuneError("run_val_every_n_steps is set but there is no dataset_val to validate on; set dataset_val "
                           "or run_val_every_n_steps=null")


def _refuse_quantized(checkpointer: Any) -> None:
    from qattune.checkpoint import is_quantized_checkpoint

    folder = getattr(checkpointer, "checkpoint_dir", None)
    if folder is not None and Path(folder).is_dir() and is_quantized_checkpoint(folder):
        raise QattuneError(
            f"checkpointer.checkpoint_dir={folder} holds a quantized model (quantization_config.json); training "
            "needs a float checkpoint: point it at the training step_N or model the quantized one came from"
        )


def _refuse_lora_builder(model_node: Any) -> None:
    """A `lora_*` / `qlora_*` builder (qattune's or torchtune's) in a recipe that trains the whole model."""
    from qattune.config.aliases import torchtune_alias

    path = str(model_node.get("_component_", "")) if model_node is not None else ""
    alias = torchtune_alias(path)
    name = ((alias.target if alias is not None and alias.target else path) or "").rsplit(".", 1)[-1]
    if name.startswith(("lora_", "qlora_")):
        raise QattuneError(f"model {path} builds LoRA adapters, which the qat_lora recipe trains (qattune run qat_lora "
                           f"--config ...); to train the whole model here, use the plain builder "
                           f"({name.split('_', 1)[1]})")


def _warn_other_output_dir(checkpointer: Any, output_dir: str) -> None:
    """torchtune configs may point `checkpointer.output_dir` elsewhere; qattune writes each checkpoint whole
    (model files and recipe state) to `output_dir/step_N`, so say where the files go."""
    theirs = getattr(checkpointer, "output_dir", None)
    if theirs is not None and Path(theirs).expanduser().absolute() != Path(output_dir):
        log.warning("checkpointer.output_dir=%s differs from output_dir=%s: checkpoints (model and recipe state) "
                    "are written to output_dir/step_N", theirs, output_dir)


def longest_sample(dataset: Any) -> Optional[int]:
    """The longest sequence `dataset` yields, where it can tell without reading every item: a packed
    dataset's pack length, or the longest of a tokenized dataset's samples (None otherwise)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return max((len(sample.tokens) for sample in samples), default=0)
    return getattr(dataset, "max_seq_len", None)


def _check_fits_model(dataset: Any, model: nn.Module, key: str) -> None:
    """Refuse, before training, data with sequences longer than the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    longest = longest_sample(dataset) if dataset is not None else None
    if limit is not None and longest is not None and longest > limit:
        raise QattuneError(
            f"{key} has sequences of up to {longest} tokens, longer than the model's max_seq_len={limit}: set "
            f"{key}.max_seq_len to at most {limit}, or raise the model's if it handles longer inputs"
        )


def _lock_output_dir(output_dir: str, dist: Any) -> Any:
    """Rank 0 (which writes the checkpoints) claims `output_dir` for the run, so that a second run into it
    stops at once; every rank stops with its line."""
    from qattune.training.checkpoint_dirs import lock_output_dir
    from qattune.training.distributed import raise_rank0_error

    lock, error = None, None
    if dist.is_main:
        try:
            lock = lock_output_dir(output_dir)
        except QattuneError as err:
            error = err
    raise_rank0_error(error)
    return lock


def _seed(seed: Optional[int], dist: Any) -> int:
    """The run's seed: `seed`, or for null a random one (torchtune's meaning), the same on every rank and
    printed so the run can be repeated."""
    if seed is not None:
        return seed
    from qattune.training.distributed import broadcast_from_rank0

    drawn = broadcast_from_rank0(int.from_bytes(os.urandom(4), "little") >> 1)
    if dist.is_main:
        print(f"seed=null: this run draws seed {drawn} (set seed={drawn} to repeat it)", flush=True)
    return drawn


def build_loss(node: Any) -> nn.Module:
    """The training loss from the `loss` config (qattune's CrossEntropyLoss when unset). torch's
    `nn.CrossEntropyLoss` (older torchtune configs) becomes qattune's, which takes the same mean over
    trained tokens, counted across micro-batches and ranks; settings it cannot honour are refused."""
    from qattune.training.loss import CrossEntropyLoss, require_summed

    if node is None:
        return CrossEntropyLoss()
    loss = instantiate(node)
    if type(loss) is nn.CrossEntropyLoss:
        options = {"weight": loss.weight is not None, "label_smoothing": loss.label_smoothing != 0.0,
                   "reduction": loss.reduction != "mean"}
        refused = [key for key, set_ in options.items() if set_]
        if refused:
            raise QattuneError(f"loss torch.nn.CrossEntropyLoss with {refused[0]} set: qattune's token-weighted "
                               "loss has no such option; use loss._component_=qattune.training.CrossEntropyLoss "
                               f"without {refused[0]}")
        return CrossEntropyLoss(ignore_index=loss.ignore_index)
    require_summed(loss)
    return loss


def _warn_profiler_never_traces(profiler: Any, total_steps: int) -> None:
    """A profiler schedule longer than the run writes no trace: say so."""
    needed = getattr(profiler, "steps_before_first_trace", None)
    if needed is not None and needed > total_steps:
        log.warning("the profiler's schedule (wait + warmup + active steps) needs %d steps, but the run has %d: it "
                    "writes no trace; lower profiler.wait_steps, warmup_steps or active_steps", needed, total_steps)


def _warn_fake_quant_never_on(step_hooks: Sequence[Any], total_steps: int) -> None:
    """`fake_quant_after_n_steps` at or past the run's end trains in float throughout: say so."""
    for hook in step_hooks:
        after = getattr(hook, "after_n_steps", None)
        if after is not None and after >= total_steps:
            log.warning("fake_quant_after_n_steps=%d but the run has %d steps: fake quantization never turns on, "
                        "so this is float training; lower fake_quant_after_n_steps", after, total_steps)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class TrainingSession:
    """Builds the pieces of a training run from `cfg`; see the module docstring for the order."""

    def __init__(self, cfg: Any, *, model_builder: Optional[Callable[[], nn.Module]] = None,
                 weights_from_resume: bool = True, load_on_rank0_only: bool = True) -> None:
        """`model_builder` builds the module the checkpoint loads into (default: `cfg.model`);
        `weights_from_resume=False` keeps loading the starting checkpoint when resuming (a frozen base
        whose trained state is restored separately, as with LoRA). Under torchrun only rank 0 loads the
        weights (on CPU) and the others hold the model on the meta device until it is sharded (see
        `_prepare_for_training`); `load_on_rank0_only=False` loads them on every rank, for a recipe
        that needs real weights everywhere before sharding (quantizing the base for real, as QLoRA does)."""
        from qattune.checkpoint import writable_directory
        from qattune.training.distributed import init_distributed
        from qattune.training.host_allocator import keep_freed_host_memory
        from qattune.training.precision import resolve_dtype

        self.cfg = cfg
        _check_numbers(cfg)
        self.output_dir = str(writable_directory(cfg.output_dir))
        if cfg.get("log_level"):
            logging.basicConfig(level=str(cfg.log_level).upper())
        self.dist = init_distributed(cfg.get("device"))
        self.output_lock = _lock_output_dir(self.output_dir, self.dist)
        if not self.dist.is_main:  # every rank would print the same warnings
            logging.getLogger("qattune").setLevel(logging.ERROR)
        self.device = self.dist.device
        self.dtype = resolve_dtype(cfg.get("dtype", "bf16"), self.device)
        if self.device.type == "cpu":
            keep_freed_host_memory()
        if cfg.get("cudnn_deterministic_mode", False):
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.seed = _seed(cfg.get("seed"), self.dist)
        torch.manual_seed(self.seed)
        # what is cheap to check first (the checkpoint's folder and config, the resume folder, the loss),
        # then the data (a wrong path or column fails before any weight is read)
        if model_builder is None:  # the recipe builds cfg.model itself: a whole-model fine-tune
            _refuse_lora_builder(cfg.get("model"))
        self.checkpointer = instantiate(cfg.checkpointer) if cfg.get("checkpointer") is not None else None
        _refuse_quantized(self.checkpointer)
        _warn_other_output_dir(self.checkpointer, self.output_dir)
        self.resume_dir = self._resume_dir()
        self.loss_fn = build_loss(cfg.get("loss"))
        self.tokenizer = instantiate(cfg.tokenizer)
        self.train_dataset = instantiate(cfg.dataset, tokenizer=self.tokenizer)
        # torchtune builds the validation set only to validate: configs keep dataset_val with validation off
        validates = cfg.get("run_val_every_n_steps") is not None and cfg.get("dataset_val") is not None
        self.val_dataset = instantiate(cfg.dataset_val, tokenizer=self.tokenizer) if validates else None
        # the logger too (a missing tensorboard is one line before any weight is read); it opens no file yet
        self.metric_logger = instantiate(cfg.metric_logger) if cfg.get("metric_logger") is not None else None
        self.rank0_loads = self.dist.is_distributed and load_on_rank0_only
        self.load_device = self._load_device()
        self.model_builder = model_builder or (lambda: instantiate(cfg.model))
        # error messages name the config's model, not this lambda
        self.model_builder.__module__, self.model_builder.__qualname__ = "", f"{cfg.model.get('_component_')} (model)"
        self.model = self._build_model(self.model_builder, weights_from_resume)
        for key, dataset in (("dataset", self.train_dataset), ("dataset_val", self.val_dataset)):
            _check_fits_model(dataset, self.model, key)
        self.base_keys = frozenset(self.model.state_dict())
        self.trainer = None
        # What a recipe customises about saving: collectives every rank runs first, the state dict to write
        # (and whether to write the model at all), extra facts for the training info file, extra files
        # written inside each checkpoint folder (by rank 0), and extra tensor files whose contents every
        # rank helps gather (file name -> state, or None to skip).
        self.before_save: list[Callable[[], None]] = []
        self.state_dict_fn: Callable[[], dict[str, torch.Tensor]] = self.float_state_dict
        self.save_model_weights = True
        self.extra_info: dict[str, Any] = {}
        self.extra_writers: list[Callable[[Path], None]] = []
        self.extra_tensor_files: dict[str, Callable[[], Optional[dict[str, torch.Tensor]]]] = {}

    # ----- model --------------------------------------------------------------------------------
    def _resume_dir(self) -> Optional[str]:
        from qattune.training.checkpoint_dirs import RECIPE_STATE_FILE, latest_checkpoint, list_step_dirs

        resume = self.cfg.get("resume_from_checkpoint", False)
        if not resume:
            self._clear_earlier_run(list_step_dirs(self.output_dir))
            return None
        if isinstance(resume, str):
            if not Path(resume, "recipe_state.pt").is_file():
                raise QattuneError(f"resume_from_checkpoint={resume}: no recipe_state.pt there; name an output_dir/step_N folder")
            return resume
        latest = latest_checkpoint(self.output_dir)
        if latest is None:
            raise QattuneError(
                f"resume_from_checkpoint=true but {self.output_dir} holds no complete step_N checkpoint (with "
                f"{RECIPE_STATE_FILE}); train without resuming first"
            )
        newest = list_step_dirs(self.output_dir)[-1][1]
        if newest != latest and self.dist.is_main:
            log.warning("%s has no %s to resume from: resuming from %s", Path(newest).name, RECIPE_STATE_FILE,
                        Path(latest).name)
        return latest

    def _clear_earlier_run(self, earlier: list[tuple[int, str]]) -> None:
        """A fresh run would write its step_N over an earlier run's: refuse, unless `overwrite_output_dir`,
        which removes the earlier run's checkpoints first (a later resume must not mix the two runs)."""
        import shutil

        from qattune.training.distributed import barrier

        if not earlier:
            return
        if not self.cfg.get("overwrite_output_dir", False):
            raise QattuneError(
                f"output_dir {self.output_dir} already holds checkpoints up to step_{earlier[-1][0]} of an earlier "
                "run, which this run would overwrite: set resume_from_checkpoint=true to continue it, choose another "
                "output_dir, or set overwrite_output_dir=true to replace it")
        if self.dist.is_main:
            print(f"overwrite_output_dir=true: removing the earlier run's {len(earlier)} checkpoint(s) in "
                  f"{self.output_dir}", flush=True)
            for _, path in earlier:
                shutil.rmtree(path)
        barrier()

    def _load_device(self) -> torch.device:
        """Where the model is built and loaded: the training device in one process (or when every rank
        loads); otherwise CPU on rank 0 and the meta device (no memory) on the others."""
        if not self.rank0_loads:
            return self.device
        return torch.device("cpu" if self.dist.is_main else "meta")

    def _build_model(self, builder: Callable[[], nn.Module], weights_from_resume: bool) -> nn.Module:
        """The model with its starting weights (the resumed ones, or the checkpointer's) in the
        training dtype, on `load_device`."""
        from qattune.checkpoint import HFCheckpointer
        from qattune.training.distributed import raise_rank0_error

        checkpointer = self.checkpointer
        if self.resume_dir is not None and weights_from_resume:
            checkpointer = HFCheckpointer(self.resume_dir)
        model, error = None, None
        try:
            model = self._load(builder, checkpointer)
        except QattuneError as err:  # under torchrun only rank 0 reads: every rank learns of its mistake
            error = err
        raise_rank0_error(error)
        return model

    def _load(self, builder: Callable[[], nn.Module], checkpointer: Any) -> nn.Module:
        """`builder`'s model with `checkpointer`'s weights (None: freshly initialised) on `load_device`;
        on the meta device only its structure is built and nothing is read."""
        from qattune.checkpoint import build_model_from_checkpoint

        target = self.load_device
        if checkpointer is not None and target.type != "meta":
            return build_model_from_checkpoint(checkpointer, builder, device=target, dtype=self.dtype)
        with torch.device(target):
            model = builder()
        return model.to(dtype=self.dtype)

    def record_quantizer(self, quantizer: Any, key: str = "quantizer") -> None:
        """Note the quantizer's scheme and options in every checkpoint, so `quantize` can check them
        (under `key`: QLoRA's `base_quantizer` is a training-memory format, which `quantize` does not hold
        the float merged model to); a resumed run must have the options its checkpoint trained with."""
        from qattune.quant.trained_options import refuse_other_options_on_resume

        if self.resume_dir is not None and key == "quantizer":
            refuse_other_options_on_resume(Path(self.resume_dir, TRAINING_INFO_FILE), quantizer, self.cfg.get(key))
        config = getattr(quantizer, "config", None)
        described = config.to_dict() if hasattr(config, "to_dict") else {"component": type(quantizer).__name__}
        self.extra_info[key] = described
        if self.dist.is_main and getattr(quantizer, "report", None) is not None:
            print(quantizer.report)

    def initialize_rounding(self, quantizer: Any) -> Optional[RoundingAtStep]:
        """Let the quantizer choose the weights' starting roundings from training batches in dataset order
        (`QATQuantizer(rounding_init="gptq")`): on a fresh run now, before training; with a float phase
        (`fake_quant_after_n_steps: N` > 0), at step N, for the weights the float phase trained: the
        returned step hook does it then (None when there is nothing to do later).

        A run resumed after the rounding has the rounded weights in its checkpoint already. Under torchrun
        rank 0 rounds: before training, on the model it loaded (the other ranks receive it when it is
        sharded); at step N, on a full copy gathered from the shards, which it sends back."""
        if getattr(quantizer, "rounding_init", "nearest") == "nearest":
            return None
        at_step = self.cfg.get("fake_quant_after_n_steps")
        if at_step:
            return RoundingAtStep(lambda: self._round_training_model(quantizer), at_step)
        if self.resume_dir is None and self.load_device.type != "meta":
            self._round(quantizer, self.model)
        return None

    def _round(self, quantizer: Any, model: nn.Module) -> None:
        """The quantizer's rounding of `model`, calibrated on the training set's first batches in order: the
        run's global batches (under torchrun rank 0 rounds alone, on every rank's samples), so the rounding
        does not depend on the number of processes."""
        global_batch = self.cfg.get("batch_size", 1) * self.dist.world_size
        batches = iter(self._loader(self.train_dataset, global_batch, shuffle=False, sharded=False))
        progress = self.cfg.get("progress_bar", True) and self.dist.is_main
        report = quantizer.initialize_rounding(model, batches, progress=progress)
        if report is not None and self.dist.is_main:
            print(report, flush=True)

    def _round_training_model(self, quantizer: Any) -> None:
        """Round the model being trained (at step N); under FSDP2, rank 0 rounds a full copy on the CPU
        (prepared by the quantizer, its state gathered from the shards) and every rank then loads its
        shards of the result."""
        from qattune.training.distributed import gather_full_state_dict, load_full_state_dict

        if not self.dist.is_distributed:
            self._round(quantizer, self.model)
            return
        state = gather_full_state_dict(self.model)
        if self.dist.is_main:
            with torch.device("meta"):  # no weights to initialise: they all come from the gathered state
                full = quantizer.prepare(self.model_builder())
            full = full.to_empty(device="cpu").to(dtype=self.dtype)
            full.load_state_dict(state)
            self._round(quantizer, full)
            state = full.state_dict()
        load_full_state_dict(self.model, state)

    def load_extra_state(self) -> None:
        """When resuming, restore the state the plain model lacks (learned ranges) into the prepared model."""
        if self.resume_dir is None or not Path(self.resume_dir, EXTRA_STATE_FILE).is_file():
            return
        if self.load_device.type == "meta":
            return  # rank 0 loads it; sharding sends every rank its part
        from safetensors.torch import load_file

        extra = load_file(str(Path(self.resume_dir, EXTRA_STATE_FILE)), device=str(self.load_device))
        missing = set(extra) - set(self.model.state_dict())
        if missing:
            raise QattuneError(f"{self.resume_dir}/{EXTRA_STATE_FILE} holds {sorted(missing)[0]}, which this model "
                               "does not have; resume with the quantizer options the run was started with")
        self.model.load_state_dict(extra, strict=False)

    def frozen_copy(self) -> nn.Module:
        """A frozen copy of the starting model (a distillation teacher), before any quantization. When
        resuming, it is rebuilt from the starting checkpoint (or the seed), not from the resumed weights."""
        if self.resume_dir is None:
            teacher = copy.deepcopy(self.model)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # a randomly initialised model gets the same weights again
                teacher = self._build_model(self.model_builder, weights_from_resume=False)
        teacher.requires_grad_(False)
        return teacher.eval()

    def frozen_model_from(self, checkpoint_dir: str) -> nn.Module:
        """A frozen float model loaded from a Hugging Face folder (e.g. a full_finetune output): a
        distillation teacher other than the student's own starting point."""
        from qattune.checkpoint import HFCheckpointer

        if not Path(checkpoint_dir, "config.json").is_file():
            raise QattuneError(f"teacher_checkpoint_dir={checkpoint_dir}: no config.json there; name a Hugging Face "
                               "model folder, such as a full_finetune output's step_N")
        teacher = self._load(self.model_builder, HFCheckpointer(checkpoint_dir))
        teacher.requires_grad_(False)
        return teacher.eval()

    # ----- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, batch_size: int, shuffle: bool, *, drop_last: bool = True, name: str = "dataset",
                sharded: bool = True):
        from qattune.data import build_dataloader

        return build_dataloader(dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed,
                                drop_last=drop_last, name=name, sharded=sharded,
                                seed_given=self.cfg.get("seed") is not None)

    # ----- the run ------------------------------------------------------------------------------
    def _prepare_for_training(self, model: nn.Module, trainable: bool) -> nn.Module:
        from qattune.training import apply_activation_checkpointing, compile_blocks, shard_model, shard_model_from_rank0

        if trainable and self.cfg.get("enable_activation_checkpointing", False):
            apply_activation_checkpointing(model)
        if self.cfg.get("compile", False):
            compile_blocks(model)
        if not self.dist.is_distributed:
            return model.to(self.device)
        reshard = {"reshard_after_forward": self.cfg.get("fsdp_reshard_after_forward", True)}
        if self.rank0_loads:
            return shard_model_from_rank0(model, self.device, **reshard)
        return shard_model(model.to(self.device), **reshard)

    def build_trainer(self, *, step_hooks: Sequence[Any] = (), teacher: Optional[nn.Module] = None,
                      teacher_from_step: int = 0, loss_fn: Optional[nn.Module] = None,
                      param_groups: Optional[Callable[[nn.Module], list[dict[str, Any]]]] = None):
        """The Trainer over the (already transformed) model, restored from `resume_dir` when resuming.

        `param_groups(model)` gives the optimizer's parameter groups (e.g. a learning rate of their own
        for some parameters); it is called after sharding, since FSDP2 replaces the parameters."""
        from qattune.training import Trainer, num_training_steps

        cfg = self.cfg
        self.model = self._prepare_for_training(self.model, trainable=True)
        if teacher is not None:
            teacher = self._prepare_for_training(teacher, trainable=False)
        train_loader = self._loader(self.train_dataset, cfg.get("batch_size", 1), cfg.get("shuffle", True))
        val_loader = None
        if self.val_dataset is not None:
            val_loader = self._loader(self.val_dataset, cfg.get("batch_size_val") or cfg.get("batch_size", 1), False,
                                      drop_last=False, name="dataset_val")  # every validation sample scored
        if param_groups is not None:
            params = param_groups(self.model)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = instantiate(cfg.optimizer, params)
        accumulation = cfg.get("gradient_accumulation_steps", 1)
        total_steps = num_training_steps(len(train_loader), accumulation, cfg.get("epochs", 1),
                                         cfg.get("max_steps_per_epoch"))
        lr_scheduler = self._lr_scheduler(optimizer, total_steps)
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        profiler = instantiate(cfg.profiler) if cfg.get("profiler") is not None else None
        _warn_profiler_never_traces(profiler, total_steps)
        self.trainer = Trainer(
            self.model, optimizer, loss_fn, train_loader,
            device=self.device,
            lr_scheduler=lr_scheduler,
            epochs=cfg.get("epochs", 1),
            max_steps_per_epoch=cfg.get("max_steps_per_epoch"),
            gradient_accumulation_steps=accumulation,
            clip_grad_norm=cfg.get("clip_grad_norm"),
            val_loader=val_loader,
            val_every_n_steps=cfg.get("run_val_every_n_steps"),
            max_val_batches=cfg.get("max_val_batches"),
            output_dir=self.output_dir,
            save_model=self.save_model,
            save_every_n_steps=cfg.get("save_every_n_steps"),
            keep_last_n_checkpoints=cfg.get("keep_last_n_checkpoints"),
            step_hooks=step_hooks,
            metric_logger=self.metric_logger,
            log_every_n_steps=cfg.get("log_every_n_steps", 1),
            progress_bar=cfg.get("progress_bar", True),
            teacher_model=teacher,
            teacher_from_step=teacher_from_step,
            profiler=profiler,
            log_peak_memory_stats=cfg.get("log_peak_memory_stats", True),
        )
        _warn_fake_quant_never_on(step_hooks, self.trainer.total_steps)
        if self.resume_dir is not None:
            self.trainer.load_checkpoint(self.resume_dir)
            self._warn_optimizer_settings_restored(optimizer)
        return self.trainer

    def _lr_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Optional[Any]:
        """The config's schedule over `optimizer`, told the run's length (`num_training_steps`, or torch's
        `total_steps`) unless the config sets it; a schedule stepped on a validation metric is refused."""
        from qattune.config.instantiate import partial

        spec = self.cfg.get("lr_scheduler")
        if spec is None:
            return None
        factory = partial(spec)
        if isinstance(factory.func, type) and issubclass(factory.func, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise QattuneError(f"lr_scheduler {spec['_component_']} steps on a validation metric; qattune steps the "
                               "schedule once per optimizer step: use a step schedule, e.g. "
                               "qattune.training.get_cosine_schedule_with_warmup")
        extra = {}
        for length in ("num_training_steps", "total_steps"):
            if _accepts(factory.func, length) and length not in spec and "epochs" not in spec:
                extra[length] = total_steps
        return factory(optimizer, **extra)

    def _warn_optimizer_settings_restored(self, optimizer: torch.optim.Optimizer) -> None:
        """A resumed optimizer keeps the checkpoint's hyperparameters; say so when the config asks for another
        learning rate (torchtune behaves the same, silently)."""
        wanted = (self.cfg.get("optimizer") or {}).get("lr")
        group = optimizer.param_groups[0]
        restored = group.get("initial_lr", group.get("lr"))
        if wanted is not None and restored is not None and float(wanted) != float(restored) and self.dist.is_main:
            log.warning("optimizer.lr=%s differs from the resumed checkpoint's %s: a resumed run keeps the "
                        "checkpoint's optimizer and schedule state; to change them, start a new run from the "
                        "checkpoint's weights (checkpointer.checkpoint_dir=%s)", wanted, restored, self.resume_dir)

    # ----- saving -------------------------------------------------------------------------------
    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict (collective under FSDP: every rank calls)."""
        from qattune.training import gather_full_state_dict

        return gather_full_state_dict(self.model)

    def save_model(self, directory: str, step: int) -> None:
        """Write the model as a Hugging Face folder (rank 0) plus qattune's training info; with
        `save_model_weights` off (a recipe saving only adapters), the training info and extra files alone."""
        from safetensors.torch import save_file

        from qattune.quant.serialization import untie_shared_tensors

        for collective in self.before_save:
            collective()
        state_dict = self.state_dict_fn() if self.save_model_weights else None
        tensor_files = {name: state() for name, state in self.extra_tensor_files.items()}
        if not self.dist.is_main:
            return
        out = Path(directory).absolute()  # a relative path would land under the checkpointer's output_dir
        if state_dict is not None:
            self._write_model_files(state_dict, out)
        for name, tensors in tensor_files.items():
            if tensors is not None:
                save_file(untie_shared_tensors(tensors), str(out / name))
        info = {"step": step, **self.extra_info}
        (out / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for write in self.extra_writers:
            write(out)

    def _write_model_files(self, state_dict: dict[str, torch.Tensor], out: Path) -> None:
        """The plain model in the Hugging Face layout, whatever layout it was read from (through the
        checkpointer when it writes that layout, keeping the source's config fields and tokenizer files),
        and the state beyond it."""
        from safetensors.torch import save_file

        from qattune.checkpoint.hf import write_hf_checkpoint
        from qattune.models import get_adapter

        base = {k: v for k, v in state_dict.items() if k in self.base_keys}
        extra = {k: v.contiguous().cpu() for k, v in state_dict.items() if k not in self.base_keys}
        if self.checkpointer is not None and self.checkpointer.format in ("hf", "gguf"):
            self.checkpointer.save(base, out)
        else:  # a fresh model, or a Meta checkpoint (resume and quantize read the HF layout)
            out.mkdir(parents=True, exist_ok=True)
            adapter = self.checkpointer.adapter if self.checkpointer is not None else get_adapter("llama")
            source = self.checkpointer.checkpoint_dir if self.checkpointer is not None else None
            write_hf_checkpoint(base, self.model_config(), adapter, out, max_shard_bytes=5 << 30,
                                base_config=self._token_ids(), source_dir=source)
        if extra:
            save_file(extra, str(out / EXTRA_STATE_FILE))

    def _token_ids(self) -> dict[str, Any]:
        """config.json's token ids from the run's tokenizer, for a model whose source has no config.json
        (transformers' LlamaConfig defaults, bos 1 and eos 2, are ordinary tokens of Llama 3)."""
        tokenizer = self.tokenizer
        stops = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
               "pad_token_id": getattr(tokenizer, "pad_id", None)}
        return {key: value for key, value in ids.items() if value is not None}

    def model_config(self):
        """The model's TransformerConfig (for saving a model that came from no checkpoint)."""
        config = getattr(self.model, "config", None)
        if config is None:
            raise QattuneError("the model has no `config`; build it with a qattune.models builder")
        return config

    def train(self) -> list[float]:
        """Run the loop to the end; returns this run's step losses."""
        if self.trainer is None:
            self.build_trainer()
        losses = self.trainer.fit()
        if self.dist.is_main and losses:
            print(f"Finished {self.trainer.global_step} steps: final loss {losses[-1]:.4f}; "
                  f"checkpoints in {self.output_dir}")
        elif self.dist.is_main:
            print(f"Nothing to train: the checkpoint finished the run's last epoch (epochs={self.trainer.epochs}) "
                  f"at step {self.trainer.global_step}; raise epochs to train further")
        return losses

    def close(self) -> None:
        from qattune.training import destroy_distributed

        if getattr(self, "metric_logger", None) is not None:
            self.metric_logger.close()
        if getattr(self, "output_lock", None) is not None:
            self.output_lock.release()
        destroy_distributed()
