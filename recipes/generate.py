"""Generate text with KV-cache decoding from a float or quantized checkpoint.

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("generate", "it will decode from float and quantized checkpoints")
