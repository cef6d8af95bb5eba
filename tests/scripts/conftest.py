"""The scripts import their shared helpers (`_args`, `bench_train`) from their own folder, which is on
`sys.path` when they run as `python scripts/NAME.py`; tests that load a script in-process put it there too."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
