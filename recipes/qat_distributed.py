"""Quantization-aware full fine-tuning: the shared training loop plus a quantizer, one device or many (FSDP2).

    qattune run qat_distributed --config llama3_2/1B_qat_full
    qattune run --nproc_per_node 8 qat_distributed --config llama3/8B_qat_full

The quantizer's `prepare` inserts fake quantization before training. `fake_quant_after_n_steps: N`
trains in float for optimizer steps < N and fake-quantized from step N; the state is derived from the
global step at every step, so a resumed run is always right. With `loss` set to
`qattune.training.DistillationLoss`, a frozen float copy of the model is the teacher: the starting model
(`teacher_snapshot: start`), or the model as it is when fake quantization turns on (`fake_quant_start`),
which has learnt what the float phase taught (see `qattune.training.distillation`).
Checkpoints are float models in the Hugging Face layout (plus learned quantization ranges, when range
learning is on) with the scheme recorded, ready for the `quantize` recipe.
"""

from typing import Literal, Optional

from qattune.config import Component, recipe_main
from qattune.training.session import TrainingConfig


class Config(TrainingConfig):
    quantizer: Component
    fake_quant_after_n_steps: Optional[int] = None
    teacher_snapshot: Literal["start", "fake_quant_start"] = "start"


def recipe(cfg) -> None:
    from qattune.config import instantiate
    from qattune.training import FakeQuantAfterNSteps
    from qattune.training.distillation import TEACHER_STATE_FILE, TeacherSnapshot
    from qattune.training.session import TrainingSession

    session = TrainingSession(cfg)
    try:
        loss_fn = instantiate(cfg.loss) if cfg.get("loss") is not None else None
        teacher = session.frozen_copy() if getattr(loss_fn, "needs_teacher", False) else None
        quantizer = instantiate(cfg.quantizer)
        session.model = quantizer.prepare(session.model)
        session.record_quantizer(quantizer)
        session.load_extra_state()
        fake_quant_after = cfg.get("fake_quant_after_n_steps")
        hooks = [FakeQuantAfterNSteps(quantizer, session.model, fake_quant_after)]
        snapshot = None
        if teacher is not None and cfg.get("teacher_snapshot") == "fake_quant_start" and fake_quant_after:
            snapshot = TeacherSnapshot(teacher, session.model, at_step=fake_quant_after)
            session.extra_tensor_files[TEACHER_STATE_FILE] = snapshot.state_dict
            hooks.append(snapshot)
        trainer = session.build_trainer(step_hooks=hooks, teacher=teacher, loss_fn=loss_fn)
        if snapshot is not None and session.resume_dir is not None:
            snapshot.resume(session.resume_dir, trainer.global_step)
        session.train()
    finally:
        session.close()


if __name__ == "__main__":
    recipe_main(recipe, __file__)
