"""Full fine-tuning without quantization, on one device or many through torchrun (FSDP2).

    qattune run full_finetune --config llama3/8B_full
    qattune run --nproc_per_node 8 full_finetune --config llama3/8B_full

Every key is one of the shared training keys (`qattune.training.session.TrainingConfig`).
"""

from qattune.config import recipe_main
from qattune.training.session import TrainingConfig


class Config(TrainingConfig):
    """The shared training keys, nothing more."""


def recipe(cfg) -> None:
    from qattune.training.session import TrainingSession

    session = TrainingSession(cfg)
    try:
        session.train()
    finally:
        session.close()


if __name__ == "__main__":
    recipe_main(recipe, __file__)
