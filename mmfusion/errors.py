"""Errors that reach the user as one line naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A bad request (missing file, wrong option, bad config): shown without a traceback."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first (condition, message) pair whose condition is false."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


class ConfigError(UserError, ValueError):
    """A bad setting, in one style wherever it is found: `<key>: <what is wrong>`, e.g.
    `diffusion.gamma: must be in [0, 1], got 1.5`. The settings types name their own field; the config
    loader puts the section in front (`within`). A ValueError too, for callers that catch that."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key, self.problem = key, problem

    def within(self, section: str) -> ConfigError:
        """The same error, its key under `section` (`gamma` -> `diffusion.gamma`)."""
        if not section:
            return self
        return ConfigError(f"{section}.{self.key}" if self.key else section, self.problem)


def check(rules: Iterable[tuple[bool, str, str]]) -> None:
    """Raise ConfigError(key, problem) for the first (ok, key, problem) rule that does not hold."""
    for ok, key, problem in rules:
        if not ok:
            raise ConfigError(key, problem)


class Stopped(Exception):
    """A run stopped on request (SIGTERM) before its end, its state saved; the process exits with 143
    (128 + SIGTERM), as a process ended by that signal would."""

    exit_code = 143
