"""The one exception type for user mistakes, and how a report reaches the user.

Raise `QattuneError` (or a subclass) for anything a user can fix: a bad path, a wrong shape in a
checkpoint, an unknown scheme. The CLI prints its message, one line per problem, with no traceback,
and exits with code 2. Write messages as: what is wrong, where, and what to do about it.

Under `qattune run`'s torchrun, a worker does not print its report: it writes it to the folder the
launcher names in `QATTUNE_REPORT_DIR`, and the launcher prints each distinct report once. Under any
other launcher, rank 0 prints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

REPORT_DIR_ENV = "QATTUNE_REPORT_DIR"


class QattuneError(Exception):
    """A user-facing error; `str(err)` is shown to the user as is."""

    exit_code = 2


def report_lines(message: str, kind: str = "error", who: str = "") -> list[str]:
    """`kind who: first line` then the other lines indented, e.g. ["error (rank 3): file not found: x"]."""
    lines = message.splitlines() or ["unknown error"]
    return [f"{kind}{who}: {lines[0]}", *(f"  {line}" for line in lines[1:])]


def _write_report(folder: str, rank: str, kind: str, message: str) -> bool:
    """Leave this worker's report for `qattune run`'s launcher; False when the folder is not writable."""
    try:
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "kind": kind, "message": message}))
        return True
    except (OSError, ValueError):
        return False


def report(message: str, kind: str = "error") -> None:
    """Show a report on stderr: under `qattune run`'s torchrun through the launcher's folder instead (or from
    every rank where that folder cannot be written), under another launcher from rank 0 only."""
    rank, folder = os.environ.get("RANK"), os.environ.get(REPORT_DIR_ENV)
    if rank is not None and folder:
        if _write_report(folder, rank, kind, message):
            return
    elif rank not in (None, "0"):
        return
    print("\n".join(report_lines(message, kind)), file=sys.stderr, flush=True)


def report_and_exit(err: QattuneError) -> NoReturn:
    """Report a user error (every line of it) and exit with its code."""
    report(str(err))
    sys.exit(err.exit_code)
