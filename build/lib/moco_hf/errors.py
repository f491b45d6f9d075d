"""The two kinds of errors a run reports in one line: the user's to fix (exit 2) and the run's own (exit 1)."""

from __future__ import annotations


class UsageError(ValueError):
    """An argument, path or setting the user gave cannot work; the message says what to change (exit status 2)."""


class DataError(UsageError):
    """A problem with the data the user pointed us at: missing split, column, no decodable image (exit status 2)."""


class RunError(RuntimeError):
    """The run cannot go on (disk full, non-finite loss, unreadable checkpoint); the message says what to do and
    that the checkpoints already written are intact (exit status 1)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): one-line errors for the user."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
