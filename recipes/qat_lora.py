"""Quantization-aware LoRA fine-tuning on a fake-quantized (or truly quantized) frozen base.

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("qat_lora", "QAT + LoRA lands with the shared training loop")
