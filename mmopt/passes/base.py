"""What every pass shares: its config base class, the context it runs in and the result it returns.

A pass module defines ``Config`` (a PassConfig), ``apply(model, cfg, ctx) -> PassResult`` and, when it
changes the module structure, ``restore(model, cfg, record, adapter)``: ``mmopt.load`` rebuilds the architecture,
calls every pass's ``restore`` in order with the ``record`` its ``apply`` returned, then loads the weights. A
pass whose weights need custom loading also defines ``load_state(model, cfg, record, state) -> state``, which
loads what it owns and returns the rest. A pass that changes what a part outputs (a classifier dropped for features) defines
``align_reference(teacher, cfg, record, adapter)``, which makes the original comparable for fidelity and
distillation in later passes.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from mmopt.progress import NO_PROGRESS, Progress


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Change:
    module: str
    before: str
    after: str


@dataclass
class Skip:
    module: str
    reason: str


@dataclass
class PassResult:
    """What a pass changed and skipped; ``record`` is handed back to ``restore`` at load time (JSON-able)."""

    changed: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)   # part -> extra report keys

    def to_json(self) -> dict:
        return {"changed": [vars(c) for c in self.changed], "skipped": [vars(s) for s in self.skipped],
                "metrics": self.metrics}


@dataclass
class Context:
    """What a pass may use besides the model."""

    adapter: Any
    teacher: Any = None                 # the model as loaded, before any pass (for distillation)
    calibration: Any = None             # mmopt.calibration.Calibration or None
    device: str = "cpu"
    seed: int = 0
    progress: Progress = NO_PROGRESS
    history: list = field(default_factory=list)   # (pass name, config) of the passes applied before this one
    base_dir: Any = None                # the recipe's folder: relative paths in pass options resolve against it


def excluded(name: str, globs: list[str]) -> str | None:
    """The first ``exclude:`` glob that matches module or parameter ``name`` (``blocks.*`` also matches
    ``blocks`` itself), or None."""
    return next((g for g in globs if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, g.rstrip(".*"))),
                None)


def target_parts(model: Any, parts: list[str] | None) -> list[str]:
    """The parts a pass works on: those named (each must exist) or all."""
    if parts is None:
        return list(model.parts)
    for part in parts:
        model.check_part(part)
    return list(parts)


def describe(tensor: Any) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


Apply = Callable[[Any, PassConfig, Context], PassResult]
