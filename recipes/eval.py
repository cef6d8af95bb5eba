"""Evaluate bf16, PTQ and QAT checkpoints side by side with lm-eval tasks and perplexity.

Not available yet: running it exits with code 2 and says so.
"""

from qattune.config import recipe_not_available

if __name__ == "__main__":
    recipe_not_available("eval", "it will run lm-eval tasks and perplexity on float and quantized checkpoints")
