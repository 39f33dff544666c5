"""Pass name -> module and model source -> adapter module: the two tables that wire mmopt together.

Modules are imported only when a recipe or command names them, so a new pass is one line here and one file
in ``passes/``; the pipeline never changes.
"""
from __future__ import annotations

import importlib
from types import ModuleType

PASSES: dict[str, str] = {
    "cast": "mmopt.passes.cast",
    "strip": "mmopt.passes.strip",
    "quantize": "mmopt.passes.quantize",
    "prune": "mmopt.passes.prune",
    "substitute": "mmopt.passes.substitute",
    "resolution": "mmopt.passes.resolution",
}

ADAPTERS: dict[str, str] = {
    "hf": "mmopt.adapters.hf:HFAdapter",
    "open_clip": "mmopt.adapters.open_clip:OpenClipAdapter",
    "torchvision": "mmopt.adapters.torchvision:TorchvisionAdapter",
}


def pass_module(name: str) -> ModuleType:
    """The module implementing pass ``name``: it defines ``Config``, ``apply`` and optionally ``restore``."""
    from mmopt.errors import RecipeError

    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}", hint=f"known passes: {', '.join(sorted(PASSES))}")
    return importlib.import_module(PASSES[name])


def adapter_for(source: str):
    """An adapter instance for a model ``source`` (hf, open_clip, torchvision)."""
    from mmopt.errors import ModelSpecError

    if source not in ADAPTERS:
        raise ModelSpecError(f"unknown model source {source!r}", hint=f"known sources: {', '.join(sorted(ADAPTERS))}")
    module, _, name = ADAPTERS[source].partition(":")
    return getattr(importlib.import_module(module), name)()
