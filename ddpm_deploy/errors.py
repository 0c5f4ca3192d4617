"""One exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix; the message says what was expected and how to fix it."""
