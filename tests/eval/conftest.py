"""The eval tests share the tiny model and byte chat tokenizer of the generation tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "generation"))
