"""The frozen float teacher of QAT distillation, and when its weights are taken from the student.

`teacher_snapshot: start` keeps the starting model as the teacher (`teacher_checkpoint_dir` names another
float model instead, such as the bf16 fine-tune of the same data). `fake_quant_start` copies the
student's float weights into the teacher at the step fake quantization turns on: after a float phase the
teacher then knows what that phase learnt (the starting model can be far worse on the training data
than the float fine-tune that PTQ is measured against, and a student pulled towards it cannot beat it).
Until then there is no teacher: the float phase trains on the cross entropy alone (the trainer's
`teacher_from_step`), as a run without distillation does, and the teacher is not run.
The snapshot goes into every later checkpoint (`teacher.safetensors`) and is restored on resume, so a
resumed run distils from the same teacher as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.training.distributed import gather_full_state_dict, load_full_state_dict

TEACHER_STATE_FILE = "teacher.safetensors"


class TeacherSnapshot:
    """Step hook: before optimizer step `at_step` runs, the teacher becomes a copy of the student.

    Parameters and buffers are copied by name (the student may hold more, e.g. learned ranges), shard
    by shard under FSDP2, so nothing is gathered.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, at_step: int) -> None:
        self.teacher = teacher
        self.student = student
        self.at_step = at_step
        self.taken = False

    def on_step_start(self, step: int) -> None:
        if not self.taken and step >= self.at_step:
            self._copy_from_student()
            self.taken = True

    @torch.no_grad()
    def _copy_from_student(self) -> None:
        student = self.student.state_dict()
        for name, tensor in self.teacher.state_dict().items():
            tensor.copy_(student[name])

    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The teacher's full state once the snapshot is taken (None before); call on every rank."""
        return gather_full_state_dict(self.teacher) if self.taken else None

    def resume(self, checkpoint_dir: str, global_step: int) -> None:
        """Restore the snapshot a checkpoint taken after `at_step` holds (earlier ones need none: the
        hook takes it when the resumed run reaches `at_step`)."""
        if global_step <= self.at_step:
            return
        path = Path(checkpoint_dir, TEACHER_STATE_FILE)
        if not path.is_file():
            raise QattuneError(
                f"{checkpoint_dir} was saved at step {global_step}, after the teacher snapshot at step "
                f"{self.at_step}, but holds no {TEACHER_STATE_FILE}; resume with the teacher_snapshot the run "
                "was started with"
            )
        from safetensors.torch import load_file

        load_full_state_dict(self.teacher, load_file(str(path)))
        self.taken = True


def build_teacher(session: Any, loss_fn: Any, checkpoint_dir: Optional[str],
                  snapshot: Optional[str]) -> Optional[nn.Module]:
    """The frozen float teacher a distillation loss needs (None for other losses): loaded from
    `checkpoint_dir` when given, else a copy of the student's starting model."""
    if not getattr(loss_fn, "needs_teacher", False):
        named = [key for key, on in (("teacher_checkpoint_dir", checkpoint_dir is not None),
                                     ("teacher_snapshot=fake_quant_start", snapshot == "fake_quant_start")) if on]
        if named:
            raise QattuneError(f"{named[0]} names a distillation teacher, but the loss is not one: set "
                               "loss._component_=qattune.training.DistillationLoss, or remove it")
        return None
    if checkpoint_dir is None:
        return session.frozen_copy()
    if snapshot == "fake_quant_start":
        raise QattuneError("teacher_checkpoint_dir and teacher_snapshot=fake_quant_start both name the teacher; "
                           "set one of them")
    return session.frozen_model_from(checkpoint_dir)


def teacher_snapshot_hook(session: Any, teacher: Optional[nn.Module], snapshot: Optional[str],
                          fake_quant_after_n_steps: Optional[int]) -> Optional[TeacherSnapshot]:
    """For `teacher_snapshot: fake_quant_start` (with a teacher and a float phase), the hook that takes
    the snapshot, registered to be saved with every checkpoint; otherwise None."""
    if teacher is None or snapshot != "fake_quant_start" or not fake_quant_after_n_steps:
        return None
    hook = TeacherSnapshot(teacher, session.model, at_step=fake_quant_after_n_steps)
    session.extra_tensor_files[TEACHER_STATE_FILE] = hook.state_dict
    return hook
