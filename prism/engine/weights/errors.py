"""The one error type of weight loading, and turning library errors into one-line reasons."""
from __future__ import annotations


class WeightsError(ValueError):
    """A checkpoint is missing, unreadable or does not fit its config; names the file."""


def one_line(error: BaseException) -> str:
    """The first line of a library's error message: our messages stay one line long."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
