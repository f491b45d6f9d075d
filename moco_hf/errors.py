"""The two kinds of errors a run reports in one line: the user's to fix (exit 2) and the run's own (exit 1)."""

from __future__ import annotations


class UsageError(ValueError):
    """An argument, path or setting the user gave cannot work; the message says what to change (exit status 2)."""


class DataError(UsageError):
    """A problem with the data the user pointed us at: missing split, column, no decodable image (exit status 2)."""


class RunError(RuntimeError):
    """The run cannot go on (disk full, non-finite loss, unreadable checkpoint); the message says what to do and
    that the checkpoints already written are intact (exit status 1)."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped a run at a step boundary, after it saved a checkpoint to resume from (the command
    exits with 128 + the signal's number, as a shell does)."""

    def __init__(self, signal_number: int, step: int) -> None:
        super().__init__(f"stopped by signal {signal_number} at step {step}; a checkpoint of that step was saved")
        self.signal_number, self.step = signal_number, step


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): one-line errors for the user."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
