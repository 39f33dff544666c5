"""The Python API: ``optimize``, ``validate``, ``profile`` and ``load``. The CLI is a thin layer over these."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmopt.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from torch import nn

    from mmopt.recipe import Recipe


@dataclass(frozen=True)
class Overrides:
    """Changes to a recipe made without editing it: ``values`` as ``KEY=VALUE`` (``passes.0.quantize.method=nf4``,
    the VALUE read as YAML) and ``output``, a folder relative to the current one."""

    values: list[str] = field(default_factory=list)
    output: str | Path | None = None

    def as_values(self) -> list[str]:
        out = list(self.values)
        if self.output is not None:
            out.append(f"output={Path(self.output).expanduser().resolve()}")
        return out


def validate(recipe: str | Path, overrides: Overrides | None = None) -> Recipe:
    """Parse and validate a recipe file, its calibration data, model files, output path and part names, without
    loading the model's weights."""
    from mmopt.calibration import Calibration
    from mmopt.recipe import load_recipe

    from mmopt import preflight

    parsed = load_recipe(Path(recipe), overrides=(overrides or Overrides()).as_values())
    preflight.check(parsed)
    Calibration.from_recipe(parsed)
    return parsed


def optimize(recipe: str | Path, force: bool = False, progress: Progress = NO_PROGRESS,
             overrides: Overrides | None = None, latency: bool = False, stream: bool | None = None) -> dict | None:
    """Carry out a recipe file; return the report dict (also written into the output folder).

    ``latency``: time forwards at the recipe's batch even on a CPU (otherwise a batch-1 run, scaled).
    ``stream``: write a cast / strip tensor by tensor without loading the model (True), never (False), or when
    the weights would not fit in memory (None).

    A failed gate does not raise: the output is written and ``report["passed"]`` is False. In a process that a
    launcher started beside others (``accelerate launch``, ``torchrun``) only the main one (RANK 0) writes and
    returns the report; the others share the distillation and return None.
    """
    from mmopt import pipeline
    from mmopt.warnings_filter import say_once

    say_once()
    parsed = validate(recipe, overrides)
    from mmopt import pipeline_streamed

    if pipeline_streamed.wanted(parsed, stream):
        from mmopt.distill import parallel

        if not parallel.is_main():      # nothing to share: streaming learns nothing
            return None
        return pipeline_streamed.run(parsed, force=force, progress=progress, recipe_path=str(recipe))
    return pipeline.run(parsed, force=force, progress=progress, recipe_path=str(recipe), latency=latency)


def plan(recipe: str | Path, overrides: Overrides | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """What ``optimize`` would do, without doing it: the recipe validated, the model loaded, its memory before
    any pass (sizes and estimated peak), the passes in order and where the output would go. Writes nothing."""
    from mmopt import pipeline

    return pipeline.plan(validate(recipe, overrides), progress=progress, recipe_path=str(recipe))


def check(recipe: str | Path, overrides: Overrides | None = None) -> dict:
    """Re-evaluate a recipe's gates on its existing output (weight hashes verified); nothing is recomputed."""
    from mmopt import pipeline

    return pipeline.check(validate(recipe, overrides))


def verify(path: str | Path) -> list[str]:
    """Check every file of output ``path`` that a loader reads (weights, config, tokenizer, ...) against its sha256
    in ``mmopt.json``; return the files checked. A missing or changed file raises ``IntegrityError`` naming it."""
    from mmopt import checkpoint

    return checkpoint.verify_folder(Path(path))


def pass_catalog(name: str | None = None) -> list[dict]:
    """Every pass (or only ``name``): its one-line summary and its options with types, defaults, descriptions."""
    from mmopt import registry
    from mmopt.errors import UserError
    from mmopt.recipe import pass_options

    if name is not None and name not in registry.PASSES:
        raise UserError(f"no pass named {name!r}; passes: {', '.join(sorted(registry.PASSES))}")
    out = []
    for pass_name in sorted(registry.PASSES) if name is None else [name]:
        cls = registry.pass_class(pass_name)
        summary = (cls.__doc__ or "").strip().splitlines()
        out.append({"name": pass_name, "summary": summary[0] if summary else "", "options": pass_options(cls.Config)})
    return out


def recipe_schema() -> dict:
    """The JSON Schema of a recipe file (``mmopt schema``), for editors that check YAML as it is typed."""
    from mmopt.recipe import recipe_json_schema

    return recipe_json_schema()


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
    from mmopt.warnings_filter import say_once

    say_once()
    model = checkpoint.load_model(Path(path), parts=parts, device=device)
    model.module.mmopt_model = model
    return model.module
