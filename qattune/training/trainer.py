"""The one training loop every training recipe runs (DESIGN §5).

A step: run the step hooks, take `gradient_accumulation_steps` micro-batches, count their trained
tokens over all ranks, back-propagate each micro-batch's summed loss divided by that global count,
clip, step the optimizer and the LR schedule. Every token thus weighs the same, whatever the
split into micro-batches and ranks. Checkpoints hold the model (through the recipe's `save_model`)
and `recipe_state.pt` (optimizer, LR schedule, step, RNG, data position) for exact resume.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from qattune.data.collate import MODEL_INPUT_KEYS
from qattune.data.labels import IGNORE_INDEX
from qattune.errors import QattuneError

from . import checkpoint_dirs as ckpt
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    full_optimizer_state_dict,
    load_full_optimizer_state_dict,
    raise_rank0_error,
    world_size,
)
from .hooks import StepHook
from .loss import CrossEntropyLoss, require_summed
from .memory import peak_memory_stats, reset_peak_memory
from .profiler import NoProfiler
from .progress import ProgressBar
from .rng import rng_state, set_rng_state

SaveModelFn = Callable[[str, int], None]
"""`save_model(directory, global_step)`: called on every rank; writes the model files (rank 0)."""


def num_training_steps(
    batches_per_epoch: int, gradient_accumulation_steps: int, epochs: int, max_steps_per_epoch: Optional[int] = None
) -> int:
    """Optimizer steps a run takes; the LR schedule needs it before the trainer exists."""
    per_epoch = batches_per_epoch // gradient_accumulation_steps
    if max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    return per_epoch * epochs


class Trainer:
    """Trains `model` on `train_loader` (a `qattune.data.StatefulDataLoader` or anything with the
    same `set_epoch`/`state_dict`/`load_state_dict`/`__len__`/`__iter__`).

    `loss_fn(logits, labels)` must return the SUM over trained tokens (qattune's `CrossEntropyLoss`);
    with a `teacher_model`, `loss_fn(logits, labels, teacher_logits)` (qattune's `DistillationLoss`)
    from optimizer step `teacher_from_step` on (before it, e.g. while a teacher snapshot is not yet taken,
    the teacher is not run and the loss gets no teacher logits).
    Batches are dicts with `tokens`, `labels` and optionally `input_pos` and `mask`, which are passed
    to the model as keyword arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor],
        train_loader: Any,
        *,
        device: Optional[torch.device] = None,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        epochs: int = 1,
        max_steps_per_epoch: Optional[int] = None,
        gradient_accumulation_steps: int = 1,
        clip_grad_norm: Optional[float] = None,
        val_loader: Optional[Iterable] = None,
        val_every_n_steps: Optional[int] = None,
        max_val_batches: Optional[int] = None,
        output_dir: Optional[str] = None,
        save_model: Optional[SaveModelFn] = None,
        save_every_n_steps: Optional[int] = None,
        save_final: bool = True,
        keep_last_n_checkpoints: Optional[int] = None,
        step_hooks: Sequence[StepHook] = (),
        metric_logger: Optional[Any] = None,
        log_every_n_steps: int = 1,
        progress_bar: bool = True,
        teacher_model: Optional[nn.Module] = None,
        teacher_from_step: int = 0,
        profiler: Optional[Any] = None,
        log_peak_memory_stats: bool = True,
    ) -> None:
        require_summed(loss_fn)
        if teacher_model is not None and not getattr(loss_fn, "needs_teacher", False):
            raise QattuneError("a teacher model was given but the loss ignores it; use qattune.training.DistillationLoss")
        if teacher_model is None and getattr(loss_fn, "needs_teacher", False):
            raise QattuneError(f"loss {type(loss_fn).__name__} distills from a teacher, which only the qat_distributed "
                               "recipe builds: run that recipe, or use qattune.training.CrossEntropyLoss")
        if gradient_accumulation_steps < 1 or epochs < 1:
            raise QattuneError("gradient_accumulation_steps and epochs must be at least 1")
        if save_every_n_steps and output_dir is None:
            raise QattuneError("save_every_n_steps needs an output_dir to write checkpoints into; set output_dir")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.device = device or next(model.parameters()).device
        self.lr_scheduler = lr_scheduler
        self.log_peak_memory_stats = log_peak_memory_stats
        self.epochs = epochs
        self.max_steps_per_epoch = max_steps_per_epoch
        self.grad_accum = gradient_accumulation_steps
        self.clip_grad_norm = clip_grad_norm
        self.val_loader = val_loader
        self.val_every_n_steps = val_every_n_steps
        self.max_val_batches = max_val_batches
        self.output_dir = output_dir
        self.save_model = save_model
        self.save_every_n_steps = save_every_n_steps
        self.save_final = save_final
        self.keep_last_n_checkpoints = keep_last_n_checkpoints
        self.step_hooks = list(step_hooks)
        self.metric_logger = metric_logger
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = progress_bar
        self.teacher_model = teacher_model
        self.teacher_from_step = teacher_from_step
        self.profiler = profiler or NoProfiler()
        self.validation_loss_fn = CrossEntropyLoss() if teacher_model is not None else loss_fn
        self.is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self.global_step = 0
        self.epoch = 0
        self.last_saved_step: Optional[int] = None
        self.saved_steps: set[int] = set()
        self.resumed_from_step: Optional[int] = None

    # ----- schedule -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return num_training_steps(len(self.train_loader), self.grad_accum, 1, self.max_steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    # ----- one step -----------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        extras = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
        logits = model(batch["tokens"], **extras)
        if self.teacher_model is None:
            return self.loss_fn(logits, batch["labels"])
        if self.global_step < self.teacher_from_step:
            return self.loss_fn(logits, batch["labels"], None)
        with torch.no_grad():
            teacher_logits = self.teacher_model(batch["tokens"], **extras)
        return self.loss_fn(logits, batch["labels"], teacher_logits)

    def train_step(self, micro_batches: list[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (this rank's share); returns its metrics.

        Tokens are counted on the host before the batches move, and the metrics are read back in one
        transfer at the end, so a step waits for the device only once.
        """
        for hook in self.step_hooks:
            hook.on_step_start(self.global_step)
        self.model.train()
        local_counts = [
            sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches),
            sum(b["tokens"].numel() for b in micro_batches),
        ]
        counts = all_reduce_sum(torch.tensor(local_counts, dtype=torch.int64, device=self.device))
        trained = counts[0].clamp(min=1).to(torch.float32)
        # data-parallel gradients are averaged over ranks, so scale by world size to get sum / global count
        scale = world_size() / trained
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in micro_batches:
            loss = self._forward_loss(self.model, self._to_device(batch))
            (loss * scale).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.full((), float("nan"), device=self.device)
        if self.clip_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        mean_loss = all_reduce_sum(loss_sum) / trained
        loss_value, grad_norm_value = torch.stack([mean_loss, grad_norm.float()]).tolist()
        metrics = {"loss": loss_value, "lr": lr}
        if self.clip_grad_norm is not None:
            metrics["grad_norm"] = grad_norm_value
        trained_tokens, processed_tokens = counts.tolist()
        metrics["trained_tokens"] = float(trained_tokens)
        metrics["processed_tokens"] = float(processed_tokens)
        for hook in self.step_hooks:
            metrics.update(getattr(hook, "metrics", dict)())
        return metrics

    # ----- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Token-weighted mean loss over the validation loader (all ranks together); plain token cross
        entropy when distilling, so validation numbers compare across runs."""
        if self.val_loader is None:
            raise QattuneError("validation was requested but no validation dataset was given; set a val dataset")
        if hasattr(self.val_loader, "restart"):
            self.val_loader.restart()
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float32 if self.device.type == "mps" else torch.float64, device=self.device)
        for index, batch in enumerate(self.val_loader):
            if self.max_val_batches is not None and index >= self.max_val_batches:
                break
            batch = self._to_device(batch)
            extras = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
            logits = self.model(batch["tokens"], **extras)
            totals[0] += self.validation_loss_fn(logits, batch["labels"]).to(totals.dtype)
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
        self.model.train()
        loss_sum, count = all_reduce_sum(totals).tolist()
        return loss_sum / max(count, 1.0)

    # ----- checkpoints --------------------------------------------------------------------------
    def recipe_state(self) -> dict[str, Any]:
        """Everything besides the model needed to continue exactly (collective: all ranks call)."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "optimizer": full_optimizer_state_dict(self.model, self.optimizer),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "data": self.train_loader.state_dict(),
            "rng": all_gather_object(rng_state()),
            "world_size": world_size(),
            "gradient_accumulation_steps": self.grad_accum,
            "optimizer_class": type(self.optimizer).__name__,
        }

    def save_checkpoint(self) -> Optional[str]:
        """Write `output_dir/step_N` atomically: model files (via `save_model`) and `recipe_state.pt`.
        Only rank 0 writes; if the OS refuses a write (disk full, ...), the partial folder is removed and
        every rank stops with rank 0's one line (see `checkpoint_dirs.save_failure`)."""
        if self.output_dir is None:
            return None
        final_dir = os.path.join(self.output_dir, ckpt.step_dir_name(self.global_step))
        tmp_dir = final_dir + ".tmp"
        raise_rank0_error(self._main_writes(final_dir, lambda: ckpt.begin_checkpoint(final_dir)))
        error = None
        if self.save_model is not None:
            error = self._writes(final_dir, lambda: self.save_model(tmp_dir, self.global_step))
        state = self.recipe_state()
        if error is None:
            error = self._main_writes(final_dir, lambda: self._commit(tmp_dir, final_dir, state))
        raise_rank0_error(error)
        self.saved_steps.add(self.global_step)
        if self.is_main and self.keep_last_n_checkpoints is not None:
            ckpt.prune_step_dirs(self.output_dir, self.keep_last_n_checkpoints, self._own_checkpoint)
        self.last_saved_step = self.global_step
        return final_dir

    @staticmethod
    def _commit(tmp_dir: str, final_dir: str, state: dict[str, Any]) -> None:
        ckpt.save_recipe_state(tmp_dir, state)
        ckpt.commit_checkpoint(tmp_dir, final_dir)

    def _writes(self, final_dir: str, write: Callable[[], None]) -> Optional[QattuneError]:
        """Run `write`, part of saving `final_dir`, on this rank; rank 0's failure removes the partial
        checkpoint and, when the OS refused a write, comes back as its one line (None: it went through)."""
        if not self.is_main:
            write()
            return None
        try:
            write()
        except BaseException as err:
            failure = ckpt.save_failure(final_dir, err)
            ckpt.abandon_checkpoint(final_dir)
            if failure is None:
                raise
            return failure
        return None

    def _main_writes(self, final_dir: str, write: Callable[[], None]) -> Optional[QattuneError]:
        """`_writes` on rank 0 only (file steps the other ranks have no part in)."""
        return self._writes(final_dir, write) if self.is_main else None

    def _save_unless_saved(self) -> None:
        """Save a checkpoint of the current step unless one was just saved (or loaded)."""
        if self.last_saved_step != self.global_step:
            self.save_checkpoint()

    def _own_checkpoint(self, step: int) -> bool:
        """Whether `step_{step}` belongs to this run's line: saved by it, or at or before the step it
        resumed from (a longer earlier run's later checkpoints in the same folder are not its own)."""
        resumed = self.resumed_from_step
        return step in self.saved_steps or (resumed is not None and step <= resumed)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore optimizer, LR schedule, step, epoch, data position and RNG from `checkpoint_dir`
        (the recipe loads the model weights first). Call after everything else is built."""
        state = ckpt.load_recipe_state(checkpoint_dir)
        self._check_resumable(checkpoint_dir, state)
        try:
            load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
            raise QattuneError(
                f"checkpoint '{checkpoint_dir}': its optimizer state does not fit this run's "
                f"{type(self.optimizer).__name__} ({reason}); resume with the optimizer (and parameter groups) "
                "the run was started with"
            ) from None
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.train_loader.load_state_dict(state["data"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        set_rng_state(state["rng"][rank])
        self.last_saved_step = self.resumed_from_step = self.global_step

    def _check_resumable(self, checkpoint_dir: str, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written with another process count, accumulation or optimizer class."""
        for key, ours, advice in (
            ("world_size", world_size(), "the same number of processes (--nnodes x --nproc_per_node)"),
            ("gradient_accumulation_steps", self.grad_accum, "the same gradient_accumulation_steps"),
            ("optimizer_class", type(self.optimizer).__name__, "the same optimizer"),
        ):
            theirs = state.get(key, ours)  # older checkpoints did not record every key
            if theirs != ours:
                raise QattuneError(f"checkpoint '{checkpoint_dir}' was written with {key}={theirs}, this run has "
                                   f"{key}={ours}; resume with {advice}")

    # ----- the loop -----------------------------------------------------------------------------
    def _log(self, metrics: Mapping[str, float]) -> None:
        if self.metric_logger is not None and self.is_main:
            self.metric_logger.log(dict(metrics), self.global_step)

    def _after_step(self, metrics: dict[str, float]) -> None:
        step = self.global_step
        if self.val_every_n_steps and step % self.val_every_n_steps == 0 and self.val_loader is not None:
            self._log({"val_loss": self.validate()})
        if step % self.log_every_n_steps == 0:
            self._log(metrics)
        if self.save_every_n_steps and step % self.save_every_n_steps == 0:
            self.save_checkpoint()

    def fit(self) -> list[float]:
        """Train to the end of the last epoch; returns the loss of every step this call ran."""
        if self.steps_per_epoch == 0:
            raise QattuneError(
                f"the training data gives {len(self.train_loader)} batch(es) per epoch, fewer than "
                f"gradient_accumulation_steps={self.grad_accum}; use more data or fewer accumulation steps"
            )
        losses: list[float] = []
        if self.metric_logger is not None and self.is_main and hasattr(self.metric_logger, "start"):
            self.metric_logger.start(self.global_step)  # a resumed run's log continues from its step
        bar = ProgressBar(self.total_steps, self.global_step, enabled=self.progress_bar and self.is_main)
        reset_peak_memory(self.device)
        try:
            self._run_epochs(bar, losses)
        finally:
            bar.close()
        self.epoch = self.epochs
        if self.save_final:
            self._save_unless_saved()
        return losses

    def _run_epochs(self, bar: ProgressBar, losses: list[float]) -> None:
        with self.profiler as profiler:
            for epoch in range(self.epoch, self.epochs):
                self.epoch = epoch
                self.train_loader.set_epoch(epoch)
                done_in_epoch = self.train_loader.state_dict()["batches_done"] // self.grad_accum
                batches = iter(self.train_loader)
                for _ in range(done_in_epoch, self.steps_per_epoch):
                    started = time.perf_counter()
                    metrics = self.train_step([next(batches) for _ in range(self.grad_accum)])
                    self.global_step += 1
                    elapsed = time.perf_counter() - started
                    metrics["tokens_per_second"] = metrics["processed_tokens"] / max(elapsed, 1e-9)
                    metrics["epoch"] = epoch
                    if self.log_peak_memory_stats:
                        metrics.update(peak_memory_stats(self.device))
                    losses.append(metrics["loss"])
                    bar.update(self.global_step, metrics["loss"], metrics["tokens_per_second"])
                    self._after_step(metrics)
                    profiler.step()
                if epoch < self.epochs - 1:  # the last epoch's end is the final checkpoint (`fit`)
                    self._save_unless_saved()
