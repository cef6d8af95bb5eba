"""The one exception type for user mistakes.

Raise `QattuneError` (or a subclass) for anything a user can fix: a bad path, a wrong shape in a
checkpoint, an unknown scheme. The CLI prints its message, one line per problem, with no traceback,
and exits with code 2. Write messages as: what is wrong, where, and what to do about it.
"""

from typing import NoReturn


class QattuneError(Exception):
    """A user-facing error; `str(err)` is shown to the user as is."""

    exit_code = 2


def report_and_exit(err: QattuneError) -> NoReturn:
    """Print a user error (every line of it) to stderr and exit with its code; rank 0 only under torchrun."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":
        lines = str(err).splitlines() or ["unknown error"]
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
    sys.exit(err.exit_code)
