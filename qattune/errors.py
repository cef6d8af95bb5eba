"""The one exception type for user mistakes.

Raise `QattuneError` (or a subclass) for anything a user can fix: a bad path, a wrong shape in a
checkpoint, an unknown scheme. The CLI prints its message, one line per problem, with no traceback,
and exits with code 2. Write messages as: what is wrong, where, and what to do about it.
"""


class QattuneError(Exception):
    """A user-facing error; `str(err)` is shown to the user as is."""

    exit_code = 2
