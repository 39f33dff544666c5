"""A progress interface the library reports to; the CLI renders it, tests and the API default to silence."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None): ...


class _NoTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass


class _NoProgress:
    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield _NoTask()


NO_PROGRESS: Progress = _NoProgress()
