"""Third-party chatter kept off stderr unless asked for (``--verbose``, ``--debug``).

bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 forward (hundreds of lines a run) and
"Failed to load CPU gemm_4bit_forward from kernels-community" once per 4-bit run; transformers, torch and
torch-pruning add their own warnings. While the command runs they are counted instead of printed, and one line
per source says what was held back. Errors from these libraries still print.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

# Top-level loggers of the libraries mmopt drives; their children (bitsandbytes.backends.cpu.ops) propagate here.
THIRD_PARTY_LOGGERS = ("bitsandbytes", "transformers", "sentence_transformers", "torch", "torch_pruning",
                       "accelerate", "open_clip", "timm", "torchao", "huggingface_hub", "PIL")


# Said by torch (>= 2.14) each time torchao (0.18) is imported, which transformers does whenever torchao is installed:
# nothing a user of mmopt can act on, so not even counted.
IMPORT_NOISE = ("register_constant() on Enum subclasses is deprecated",)


@dataclass
class Held:
    """Warnings held back, per source: how many and the first message."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, message: str) -> None:
        self.counts[source] = self.counts.get(source, 0) + 1
        self.first.setdefault(source, " ".join(message.split())[:120])

    def lines(self) -> list[str]:
        """One line per source, for stderr."""
        return [f"note: {count} warning{'s' if count > 1 else ''} from {source} hidden "
                f"(first: {self.first[source]!r}); --verbose shows them"
                for source, count in sorted(self.counts.items())]


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _Holding(logging.Handler):
    def __init__(self, held: Held) -> None:
        super().__init__(level=logging.DEBUG)
        self.held = held
        self.passthrough = logging.StreamHandler()
        self.passthrough.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.errors_only = _ErrorsOnly()
        self.muted: list[logging.Handler] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.passthrough.emit(record)
        elif record.levelno >= logging.WARNING:
            self._mute_others(logging.getLogger(record.name.split(".")[0]))
            if not any(noise in record.getMessage() for noise in IMPORT_NOISE):
                self.held.add(record.name.split(".")[0], record.getMessage())

    def _mute_others(self, logger: logging.Logger) -> None:
        """torch installs its own stderr handler on the ``torch`` logger when it is imported, which happens after
        this handler took the logger over (mmopt imports torch lazily); it comes after this one in the list, so
        it is told to pass errors only before it sees the record this handler holds back (torchao's import prints
        two such warnings through it)."""
        for other in logger.handlers:
            if other is not self and self.errors_only not in other.filters:
                other.addFilter(self.errors_only)
                self.muted.append(other)


@contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[Held]:
    """Hold back third-party warnings (log records and ``warnings.warn``) while the block runs; print one summary
    line per source at the end. With ``enabled`` False everything prints as usual."""
    import sys

    held = Held()
    if not enabled:
        yield held
        return
    handler = _Holding(held)
    saved = []
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        source = _package_of(filename)
        if source == "mmopt":
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            held.add(source, str(message))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show         # the usual filters still decide what is raised at all
            yield held
    finally:
        for other in handler.muted:
            other.removeFilter(handler.errors_only)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        for line in held.lines():
            sys.stderr.write(line + "\n")


def _package_of(filename: str) -> str:
    """The top-level package a warning came from, read from its file path."""
    parts = filename.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return "mmopt" if "mmopt" in parts else (parts[-1].removesuffix(".py") or "python")


# Loggers that repeat one message on every forward (bitsandbytes' int8 matmul) or every 4-bit kernel call.
REPEATING_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


class _Once(logging.Filter):
    """Lets each message template through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def say_once() -> None:
    """For library use (``mmopt.load``, ``mmopt.optimize`` from Python, where no command holds warnings back):
    the loggers that repeat a message on every forward say it once. Logging is otherwise left as configured."""
    for name in REPEATING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
