"""Losses that return a SUM over trained tokens; the trainer divides by the global token count."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qattune.data.labels import IGNORE_INDEX
from qattune.errors import QattuneError


def _checked_ignore_index(ignore_index: int) -> int:
    """Only IGNORE_INDEX: the datasets, collate and the trainer's token counts all mark untrained labels so."""
    if ignore_index != IGNORE_INDEX:
        raise QattuneError(f"loss.ignore_index={ignore_index}: qattune's datasets mark the labels not trained on "
                           f"with {IGNORE_INDEX} (as torchtune does), and the loss must skip those; remove "
                           "loss.ignore_index")
    return ignore_index


def require_summed(loss_fn: nn.Module) -> None:
    """Refuse a loss that averages: the trainer weights every trained token itself, across micro-batches
    and ranks, so it needs the sum."""
    if getattr(loss_fn, "reduction", "sum") != "sum":
        raise QattuneError(f"loss {type(loss_fn).__name__} uses reduction='{loss_fn.reduction}'; the trainer weights "
                           "tokens itself and needs a summed loss: use qattune.training.CrossEntropyLoss")


class CrossEntropyLoss(nn.Module):
    """Token cross entropy summed over positions whose label is not `ignore_index`.

    Labels are already next-token labels (the datasets shift them), so logits[b, i] is scored against
    labels[b, i]. The sum (not the mean) lets the trainer weight every token equally across
    micro-batches and ranks.
    """

    reduction = "sum"

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = _checked_ignore_index(ignore_index)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
        )


class DistillationLoss(nn.Module):
    """Mix of token cross entropy and KL(teacher || student), both summed over trained tokens.

    loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    per trained position. With a frozen float teacher this is QAT distillation: the fake-quantized
    student learns to reproduce the float model's whole next-token distribution. Without teacher logits
    (before a teacher snapshot exists) it is the plain cross entropy.
    """

    reduction = "sum"
    needs_teacher = True

    def __init__(self, kd_weight: float = 0.5, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if not 0.0 <= kd_weight <= 1.0:
            raise QattuneError(f"loss.kd_weight must be in [0, 1] (the teacher's share of the loss), got {kd_weight}")
        if not temperature > 0:
            raise QattuneError(f"loss.temperature must be > 0 (1: the distributions as they are), got {temperature}")
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.ignore_index = _checked_ignore_index(ignore_index)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        vocab = logits.shape[-1]
        student = logits.reshape(-1, vocab).float()
        flat_labels = labels.reshape(-1)
        ce = F.cross_entropy(student, flat_labels, ignore_index=self.ignore_index, reduction="sum")
        if teacher_logits is None:
            return ce
        trained = flat_labels != self.ignore_index
        t = self.temperature
        student_logp = F.log_softmax(student[trained] / t, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits.reshape(-1, vocab)[trained].float() / t, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum() * (t * t)
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kl
