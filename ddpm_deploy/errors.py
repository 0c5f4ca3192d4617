"""Exceptions for bad input and failed runs: the CLI prints their message as a single line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix; the message says what was expected and how to fix it."""


class NonFiniteError(UserError):
    """A backend produced inf/NaN (typically fp16 overflow); the message names the step and the backend."""


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (libraries often add pages of context)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return "" if isinstance(e, str) else type(e).__name__
    return lines[0][:limit]


def remote_cause(e: BaseException) -> str:
    """The useful line of an exception raised in a Ray task or replica: Ray wraps it (RayTaskError keeps it as
    `.cause`; Serve's deployment errors only carry its text), and the wrapper's first line names Ray's frame."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return first_line(cause)
    for line in str(e).splitlines():
        if "UserError:" in line:
            return line.split("UserError:", 1)[1].strip()[:200]
    return first_line(e)
