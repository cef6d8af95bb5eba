"""Quantization-aware full fine-tuning: the shared training loop plus a quantizer, one device or many (FSDP2).

    qattune run qat_distributed --config llama3_2/1B_qat_full
    qattune run --nproc_per_node 8 qat_distributed --config llama3/8B_qat_full

The quantizer's `prepare` inserts fake quantization before training. `fake_quant_after_n_steps: N`
trains in float for optimizer steps < N and fake-quantized from step N; the state is derived from the
global step at every step, so a resumed run is always right. With `loss` set to
`qattune.training.DistillationLoss`, a frozen float copy of the model is the teacher: the starting model
(`teacher_snapshot: start`), or the model as it is when fake quantization turns on (`fake_quant_start`),
which has learnt what the float phase taught (see `qattune.training.distillation`), or a float model
from another run (`teacher_checkpoint_dir`, e.g. the bf16 fine-tune of the same data).
With `quantizer.range_learning: true` the weight scales are trained too (LSQ), at `range_learning_lr`
when set (default: the optimizer's rate); adding `quantizer.rounding_init: gptq` starts training from
GPTQ's roundings (calibrated on the first training batches) instead of the nearest ones, and
`quantizer.awq_scaling: true` scales each block's channels before GPTQ rounds it (AWQ, exact in float;
the norm gains and weights carry the factors). They run before training, or with a float phase at step
N on the weights it trained (under torchrun, on rank 0: a full copy gathered from the shards). Checkpoints are
float models in the Hugging Face layout (plus learned quantization ranges, when range learning is on)
with the scheme recorded, ready for `quantize`.
"""

from typing import Literal, Optional

from qattune.config import Component, recipe_main
from qattune.training.session import TrainingConfig


class Config(TrainingConfig):
    quantizer: Component
    fake_quant_after_n_steps: Optional[int] = None
    teacher_snapshot: Literal["start", "fake_quant_start"] = "start"
    teacher_checkpoint_dir: Optional[str] = None
    range_learning_lr: Optional[float] = None  # learned ranges' own learning rate (quantizer.range_learning)


def recipe(cfg) -> None:
    import functools

    from qattune.config import instantiate
    from qattune.quant.range_learning import range_learning_param_groups
    from qattune.training import FakeQuantAfterNSteps
    from qattune.training.distillation import build_teacher, teacher_snapshot_hook
    from qattune.training.session import TrainingSession

    session = TrainingSession(cfg)
    try:
        loss_fn = session.loss_fn
        teacher = build_teacher(session, loss_fn, cfg.get("teacher_checkpoint_dir"), cfg.get("teacher_snapshot"))
        quantizer = instantiate(cfg.quantizer)
        session.model = quantizer.prepare(session.model)
        session.record_quantizer(quantizer)
        session.load_extra_state()
        rounding = session.initialize_rounding(quantizer)
        fake_quant_after = cfg.get("fake_quant_after_n_steps")
        snapshot = teacher_snapshot_hook(session, teacher, cfg.get("teacher_snapshot"), fake_quant_after)
        # at the switch: the teacher copies the float weights, then the rounding moves them, then fake quantization
        hooks = [hook for hook in (snapshot, rounding) if hook is not None]
        hooks.append(FakeQuantAfterNSteps(quantizer, session.model, fake_quant_after))
        groups = None
        if cfg.get("range_learning_lr") is not None:
            groups = functools.partial(range_learning_param_groups, lr=cfg.range_learning_lr)
        # a snapshot teacher exists from the switch on: the float phase trains on cross entropy alone
        trainer = session.build_trainer(step_hooks=hooks, teacher=teacher,
                                        teacher_from_step=snapshot.at_step if snapshot is not None else 0,
                                        loss_fn=loss_fn, param_groups=groups)
        if snapshot is not None and session.resume_dir is not None:
            snapshot.resume(session.resume_dir, trainer.global_step)
        session.train()
    finally:
        session.close()


if __name__ == "__main__":
    recipe_main(recipe, __file__)
