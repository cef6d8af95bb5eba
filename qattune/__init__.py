"""qattune: quantization-aware fine-tuning for large language models.

Importing this package is cheap on purpose: nothing heavy (torch included) is imported here,
so the command line starts fast. Import the sub-packages you need.
"""

__version__ = "0.1.0"
