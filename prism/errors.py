"""The root of Prism's exceptions.

`UserError` is what a user can cause and fix (a bad config, model name, option or request, a
corrupt weight file, a model too big for the memory given): its message is meant for people,
so the CLI prints it as one line (exit 2), HTTP answers it as a 4xx, and a worker rejects the
request and goes on. Anything else is a bug or a broken machine: it keeps its traceback (a
crash report on the CLI, a 500 on HTTP, logged by the server).
"""
from __future__ import annotations


class PrismError(Exception):
    """Every exception Prism raises on purpose."""


class UserError(PrismError, ValueError):
    """Caused by what a user gave (config, option, request, files); the message says what to fix.
    A ValueError too: a bad value is what it is, and validators (pydantic's) turn a ValueError's
    message into their own error. What matters is where it is caught: as a UserError."""


USER_ERROR_EXIT = 2  # the CLI's exit code for a user's error (one line on stderr); a bug exits 1


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
