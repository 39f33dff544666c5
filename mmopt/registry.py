"""Pass name -> Pass class and model source -> adapter class: the two tables that wire mmopt together.

Entries are ``"module:Class"`` strings imported only when a recipe or command names them, so a new pass is one
line here and one file in ``passes/``; the pipeline never changes.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.passes.base import Pass

PASSES: dict[str, str] = {
    "cast": "mmopt.passes.cast:Cast",
    "strip": "mmopt.passes.strip:Strip",
    "quantize": "mmopt.passes.quantize:Quantize",
    "prune": "mmopt.passes.prune:Prune",
    "substitute": "mmopt.passes.substitute:Substitute",
    "resolution": "mmopt.passes.resolution:Resolution",
}

ADAPTERS: dict[str, str] = {
    "hf": "mmopt.adapters.hf:HFAdapter",
    "open_clip": "mmopt.adapters.open_clip:OpenClipAdapter",
    "torchvision": "mmopt.adapters.torchvision:TorchvisionAdapter",
    "timm": "mmopt.adapters.timm:TimmAdapter",
}


def _load(entry: str) -> type:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def pass_class(name: str) -> type[Pass]:
    """The Pass subclass registered as ``name``."""
    from mmopt.errors import RecipeError

    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}", hint=f"known passes: {', '.join(sorted(PASSES))}")
    return _load(PASSES[name])


def make_pass(name: str, options: dict) -> Pass:
    """Pass ``name`` with its options validated (as a manifest or report.json records them)."""
    cls = pass_class(name)
    return cls(cls.Config.model_validate(options))


def adapter_for(source: str) -> Adapter:
    """An adapter instance for a model ``source`` (hf, open_clip, torchvision, timm)."""
    from mmopt.errors import ModelSpecError

    if source not in ADAPTERS:
        raise ModelSpecError(f"unknown model source {source!r}", hint=f"known sources: {', '.join(sorted(ADAPTERS))}")
    return _load(ADAPTERS[source])()
