"""What every pass shares: the Pass base class, its config base, the context it runs in and the result it returns.

A pass is a class constructed with its config (``Quantize(QuantizeConfig(method="nf4"))``) and a small
lifecycle the runner calls directly, in this order:

- ``check(model, ctx)``, for every pass before any measuring, refuses options that cannot work (fail fast);
- ``apply(model, ctx) -> PassResult`` changes the model; the result's ``record`` (JSON-able) goes into the
  manifest;
- ``align_reference(teacher, record, adapter)`` makes the original comparable with the changed model, for
  fidelity and distillation in later passes (a classifier dropped for features: drop it from the original too);
- at load time, ``restore(model, record, adapter)`` re-applies the structural changes on the rebuilt
  architecture, then ``load_state(model, record, state)`` loads the weights it owns and returns the rest;
- ``brief(metrics)`` puts the pass's metrics for one part in a few words for the report table.

``needs_teacher`` says whether ``apply`` reads ``ctx.teacher`` (distillation, layer choice); only then does the
runner keep a copy of the original in memory beside the model it changes. Otherwise the original is reloaded from
its source once the passes are done, for fidelity, so that a cast of a large model never holds it twice.

``learns_from_calibration`` says whether the pass fits itself to calibration data (distillation, a fitted
projection, a layer choice, activation-based importance); the runner then measures fidelity on samples held
out from it. A pass whose answer depends on its options overrides it with a property reading ``self.config``.
"""
from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from mmopt.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    import torch

    from mmopt.adapters.base import Adapter
    from mmopt.calibration import Calibration
    from mmopt.core import Model


class PassConfig(BaseModel):
    """A pass's options: frozen, and unknown keys refused (a typo fails with its path)."""

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
    """What a pass changed and skipped; ``record`` is handed back to ``restore`` at load time (JSON-able);
    ``metrics`` holds, per part, what the pass reports about it (under ``passes[i].metrics`` in report.json)."""

    changed: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"changed": [vars(c) for c in self.changed], "skipped": [vars(s) for s in self.skipped],
                "metrics": self.metrics}


@dataclass
class Context:
    """What a pass may use besides the model."""

    adapter: Adapter
    teacher: Model | None = None            # the model as loaded, when a pass ``needs_teacher``
    calibration: Calibration | None = None
    device: str = "cpu"
    seed: int = 0
    progress: Progress = NO_PROGRESS
    history: list[Pass] = field(default_factory=list)   # the passes applied before this one
    base_dir: Path = Path(".")              # the recipe's folder: relative paths in pass options resolve against it


class Pass(ABC):
    """One step of a recipe. Subclasses set ``name`` (the YAML key), ``Config`` and implement ``apply``; the other
    hooks default to doing nothing."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    learns_from_calibration: bool = False
    needs_teacher: bool = False

    def __init__(self, config: PassConfig) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def parts_named(self) -> list[tuple[tuple, str]]:
        """The part names this pass's options use, each with its option's key path (``(("parts", 0), "text")``),
        so ``validate`` can check them against the family's parts without loading the model. The default reads
        the options ``parts`` (a list) and ``part`` (one name)."""
        named = [(("parts", i), part) for i, part in enumerate(getattr(self.config, "parts", None) or [])]
        part = getattr(self.config, "part", None)
        return named + ([(("part",), part)] if isinstance(part, str) else [])

    def check(self, model: Model, ctx: Context) -> None:
        """Refuse, before anything is measured or traced, options that cannot work on ``model`` (as loaded;
        ``ctx.history`` holds the passes that will run before this one). Raise a UserError; the default checks
        that the parts the options name exist."""
        for _, part in self.parts_named():
            model.check_part(part)

    @abstractmethod
    def apply(self, model: Model, ctx: Context) -> PassResult:
        """Change ``model`` in place; say what changed, what was skipped and why."""

    def align_reference(self, teacher: Model, record: dict, adapter: Adapter) -> None:
        """Make the original ``teacher`` comparable with the changed model (default: nothing to do)."""

    def parts_after(self, parts: list[str]) -> list[str]:
        """The parts left after this pass, from its options alone (default: all of them)."""
        return parts

    @property
    def aligns_reference(self) -> bool:
        """Whether ``align_reference`` changes what the original is compared as: if none of a recipe's passes
        does, the original's outputs can be taken before the passes, from the model as loaded."""
        return type(self).align_reference is not Pass.align_reference

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Re-apply this pass's structural changes on a freshly built model, before its weights load (default:
        nothing, for passes whose changes the rebuilt architecture already has)."""

    def load_state(self, model: Model, record: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Load the weights this pass rebuilds itself from ``state``; return the rest (default: all of it)."""
        return state

    def brief(self, metrics: dict) -> str:
        """This pass's ``metrics`` for one part in a few words, for the report table (report.json has all of it).
        The default lists each metric; ``{"before": a, "after": b}`` reads ``a -> b``."""
        text = "; ".join(f"{key.replace('_', ' ')} {_words(value)}" for key, value in metrics.items())
        return text if len(text) <= BRIEF_WIDTH else text[: BRIEF_WIDTH - 3] + "..."


BRIEF_WIDTH = 90


def _words(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        if set(value) == {"before", "after"}:
            return f"{_words(value['before'])} -> {_words(value['after'])}"
        return ", ".join(f"{key.replace('_', ' ')} {_words(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_words(item) for item in value) + "]" if len(value) <= 4 else f"{len(value)} items"
    return str(value)


def excluded(name: str, globs: list[str]) -> str | None:
    """The first ``exclude:`` glob that matches module or parameter ``name`` (``blocks.*`` also matches
    ``blocks`` itself), or None."""
    return next((g for g in globs if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, g.rstrip(".*"))),
                None)


def target_parts(model: Model, parts: list[str] | None) -> list[str]:
    """The parts a pass works on: those named (each must exist) or all."""
    if parts is None:
        return list(model.parts)
    for part in parts:
        model.check_part(part)
    return list(parts)


def describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
