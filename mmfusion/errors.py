"""Errors that reach the user as one line naming the problem and the fix."""


class UserError(Exception):
    """A bad request (missing file, wrong option, bad config): shown without a traceback."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first (condition, message) pair whose condition is false."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)
