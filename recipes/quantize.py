"""Convert a float or QAT-trained checkpoint to a real quantized model (and GGUF for q4_0/q8_0).

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("quantize", "it will convert trained checkpoints to real quantized models")
