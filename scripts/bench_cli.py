"""Time the light CLI verbs (median of several cold starts) and print JSON.

    python scripts/bench_cli.py [--runs 7]

Each verb runs in a fresh interpreter, as a user would start it, so the figure includes Python start-up
and every import the verb makes. Also reports whether the verb imported torch (it must not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import positive_int

PROBE = (
    "import sys, runpy; sys.argv = ['qattune', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('qattune.cli.main', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))\n"
)


def _config(tmp: Path) -> Path:
    path = tmp / "bench.yaml"
    path.write_text(
        "output_dir: /tmp/bench\n"
        "optimizer:\n  _component_: torch.optim.AdamW\n  lr: 2e-5\n  betas: [0.9, 0.95]\n"
        "lr_scheduler:\n  _component_: torch.optim.lr_scheduler.CosineAnnealingLR\n  T_max: 100\n"
        "loss:\n  _component_: torch.nn.CrossEntropyLoss\n  ignore_index: -100\n"
    )
    return path


def time_command(args: list[str], runs: int) -> dict:
    times, imported_torch = [], None
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        imported_torch = proc.stderr.rsplit("TORCH=", 1)[-1].strip() == "True"
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": runs,
            "imported_torch": imported_torch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=7, help="cold starts per verb (median of them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp))
        commands = {
            "python -c pass (baseline)": None,
            "qattune --help": ["--help"],
            "qattune ls": ["ls"],
            "qattune validate (torch components)": ["validate", str(config)],
        }
        results = {}
        for label, argv in commands.items():
            if argv is None:
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-c", "pass"], check=True)
                    times.append(time.perf_counter() - start)
                results[label] = {"median_s": round(statistics.median(times), 4), "runs": args.runs}
            else:
                results[label] = time_command(argv, args.runs)
    print(json.dumps({"benchmark": "cli_startup", "target_s": 0.5, "results": results}, indent=2))


if __name__ == "__main__":
    main()
