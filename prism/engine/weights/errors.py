"""The one error type of weight loading, and turning library errors into one-line reasons."""
from __future__ import annotations

from prism.errors import UserError, one_line


class WeightsError(UserError):
    """A checkpoint is missing, unreadable or does not fit its config; names the file."""


__all__ = ["WeightsError", "one_line"]  # one_line: our messages stay one line long
