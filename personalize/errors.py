"""The one exception type that means "the user can fix this".

The CLI prints a UserError as a single `error: ...` line and exits with status 2; any other
exception is a bug and exits 1 (traceback behind `--debug`). Library callers can catch it too.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do about it, on one line."""

    exit_code = 2
