"""Errors that reach the user as one line naming the problem and the fix."""


class UserError(Exception):
    """A bad request (missing file, wrong option, bad config): shown without a traceback."""
