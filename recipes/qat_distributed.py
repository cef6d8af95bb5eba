"""Quantization-aware full fine-tuning: the shared training loop plus a quantizer, one device or many (FSDP2).

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("qat_distributed", "QAT training lands with the shared training loop")
