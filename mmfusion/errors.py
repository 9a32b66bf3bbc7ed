"""Errors that reach the user as one line naming the problem and the fix."""


class UserError(Exception):
    """A bad request (missing file, wrong option, bad config): shown without a traceback."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first (condition, message) pair whose condition is false."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


class Stopped(Exception):
    """A run stopped on request (SIGTERM) before its end, its state saved; the process exits with 143
    (128 + SIGTERM), as a process ended by that signal would."""

    exit_code = 143
