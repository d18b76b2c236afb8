"""The one exception type that reaches users as a single `error: ...` line (see cli.py)."""


class UserError(ValueError):
    """Bad input the user can fix: the message names the key or file and says what to do."""
