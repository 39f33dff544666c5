"""The Python API: ``optimize``, ``validate``, ``profile`` and ``load``. The CLI is a thin layer over these."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmopt.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from torch import nn

    from mmopt.recipe import Recipe


def validate(recipe: str | Path) -> Recipe:
    """Parse and validate a recipe file (and its calibration data) without loading a model."""
    from mmopt.calibration import Calibration
    from mmopt.recipe import load_recipe

    parsed = load_recipe(Path(recipe))
    Calibration.from_recipe(parsed)
    return parsed


def optimize(recipe: str | Path, force: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """Carry out a recipe file; return the report dict (also written into the output folder).

    A failed gate does not raise: the output is written and ``report["passed"]`` is False.
    """
    from mmopt import pipeline

    parsed = validate(recipe)
    return pipeline.run(parsed, force=force, progress=progress, recipe_path=str(recipe))


def check(recipe: str | Path) -> dict:
    """Re-evaluate a recipe's gates on its existing output (weight hashes verified); nothing is recomputed."""
    from mmopt import pipeline

    return pipeline.check(validate(recipe))


def profile(model: str, **options: Any) -> dict:
    """Memory of ``model`` (``open_clip:ARCH``, ``hf:PATH``, ``torchvision:NAME`` or a folder) at given shapes.

    Options: weights, part, batch_size, image_size, seq_len, dtype; train, optimizer (adamw | sgd), amp
    (bf16 | fp16), grad_ckpt; budget ("8GiB"), offload ("cpu"), frames + window, what_if, measure (CUDA).
    """
    from mmopt.memory.profile import ProfileRequest, profile as run_profile

    return run_profile(ProfileRequest(model=model, **options))


def load(path: str | Path, parts: list[str] | None = None, device: str = "cpu") -> nn.Module:
    """Load an mmopt checkpoint (only ``parts``, default all), hash-checked; return the module in eval mode.

    The module's ``mmopt_model`` attribute holds its parts, preprocessing and rebuild facts.
    """
    from mmopt import checkpoint

    model = checkpoint.load_model(Path(path), parts=parts, device=device)
    model.module.mmopt_model = model
    return model.module
