"""Exception classes and the exit codes they map to.

Library code raises these; only ``cli.main`` turns them into one line on stderr and an exit code.
"""
from __future__ import annotations

EXIT_GATE_FAILED = 1     # a failed gate is a verdict in the report, not an exception: `optimize` exits with it
EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130     # the shell's convention for SIGINT

# What each exit code means; ``mmopt --help`` and the README print this table.
EXIT_CODES = {
    0: "done (all gates passed, or none set)",
    EXIT_GATE_FAILED: "a gate failed (the output was still written)",
    EXIT_USER_ERROR: "bad input or command-line usage; nothing was written",
    EXIT_INTERNAL: "internal error (a bug: run with --debug for the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); no partial output was left",
}


class MmoptError(Exception):
    """Base class: ``message`` is one line; ``hint`` an optional second line telling what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserError(MmoptError):
    """Bad input from the user: a recipe, a path, weights, data or an unsupported combination."""

    exit_code = EXIT_USER_ERROR


class RecipeError(UserError):
    """The recipe is malformed or fails validation."""


class ModelSpecError(UserError):
    """The model cannot be found or loaded from what the user gave."""


class DataError(UserError):
    """Calibration data is missing, empty, unreadable or mismatched."""


class UnsupportedError(UserError):
    """A valid request this model or pass cannot carry out."""


class IntegrityError(UserError):
    """A checkpoint's files do not match its manifest."""


def describe_foreign(exc: BaseException) -> UserError | None:
    """Map a third-party exception that means bad input to a one-line UserError, or None if it is a bug."""
    import json

    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return UserError(f"file not found: {exc.filename or exc}")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"expected a file, got a folder: {exc.filename or exc}")
    if isinstance(exc, NotADirectoryError):
        return UserError(f"expected a folder, got a file: {exc.filename or exc}")
    if isinstance(exc, PermissionError):
        return UserError(f"permission denied: {exc.filename or exc}")
    if isinstance(exc, json.JSONDecodeError):
        return UserError(f"malformed JSON: {exc.msg} at line {exc.lineno}")
    if name == "SafetensorError" or type(exc).__module__.startswith("safetensors"):
        return UserError(f"not a readable safetensors file: {first_line(exc)}")
    if name == "OutOfMemoryError":
        return UserError(f"CUDA ran out of memory: {first_line(exc)}", hint="use a smaller batch_size")
    return None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message cut to ``limit`` characters, or its type name when it has no
    message: third-party errors often follow their first line with a traceback, a table or a URL."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
