"""Errors the caller can act on, kept apart from bugs.

`UserError` is anything the person running a job can fix (bad file, bad option,
unreachable target). The CLI prints it as one line with exit code 2; the service
will turn it into a 4xx or a failed job without retries.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """A problem with the caller's input. `str(err)` says what is wrong and how to fix it."""

    code = "invalid_input"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        self.message = message
        self.hint = hint
        if code is not None:
            # a specific reason (e.g. "zip_bomb") refines the class's general code
            self.code = code
        super().__init__(f"{message} {hint}" if hint else message)


class InputFileError(UserError):
    code = "invalid_file"


class DataError(UserError):
    code = "invalid_data"


class OptionsError(UserError):
    code = "invalid_options"


class TargetUnreachableError(UserError):
    code = "target_unreachable"


class ExportError(RuntimeError):
    """The pruned model could not be exported faithfully (a bug or an unsupported op)."""


class Cancelled(Exception):
    """Raised inside `compress` when `should_cancel()` returned True."""
