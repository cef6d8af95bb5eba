"""Full fine-tuning without quantization, on one device or many through torchrun (FSDP2).

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("full_finetune", "full fine-tuning lands with the shared training loop")
