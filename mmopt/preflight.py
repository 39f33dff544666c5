"""What ``validate`` checks beyond the schema, from small files only (no weights read, no torch): the model's
folder or weights file, the output path, and every part name the recipe uses. Every problem is reported, each
with file:line: key, as the schema's are."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mmopt import checkpoint, registry
from mmopt.core import ModelSpec
from mmopt.errors import MmoptError, RecipeError
from mmopt.paths import resolve_spec

if TYPE_CHECKING:
    from mmopt.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Raise one RecipeError listing every problem found without loading the model."""
    problems: list[str] = []
    parts = None
    try:
        parts = registry.adapter_for(recipe.model.source).parts_without_weights(
            resolve_spec(recipe.model, recipe.base_dir))
    except MmoptError as exc:
        problems.append(f"{recipe.locate(('model',))}: {exc.message}")
    for path, spec in _other_models(recipe):            # a swap's or a student's model: the same file checks
        try:
            other = registry.adapter_for(spec.source).parts_without_weights(resolve_spec(spec, recipe.base_dir))
        except MmoptError as exc:
            problems.append(f"{recipe.locate(path)}: {exc.message}")
            continue
        if path[-1] == "student" and other is not None and "text" not in other:   # it replaces a text encoder
            problems.append(f"{recipe.locate(path)}: not a text encoder (it has parts {', '.join(other)})")
    try:
        checkpoint.check_output(recipe.output_path, force=True)     # an existing folder is --force's business
    except MmoptError as exc:
        problems.append(f"{recipe.locate(('output',))}: {exc.message}")
    if parts is not None:
        for path, part in named_parts(recipe):
            if part not in parts:
                problems.append(f"{recipe.locate(path)}: this model has no part {part!r}; it has: {', '.join(parts)}")
    if problems:
        raise RecipeError("\n".join(dict.fromkeys(problems)))


def named_parts(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Every part name in the recipe with its key path: ``parts:``, the passes' options, per-part gates."""
    out = [(("parts", i), part) for i, part in enumerate(recipe.parts or [])]
    for i, step in enumerate(recipe.passes):
        out += [(("passes", i, step.name, *path), part) for path, part in step.parts_named()]
    out += [(("gates", "parts", part), part) for part in recipe.gates.parts]
    return out


def _other_models(recipe: Recipe) -> list[tuple[tuple, ModelSpec]]:
    """Models the passes' options name (``substitute: {swap: {...}}``), with their key paths."""
    out = []
    for i, step in enumerate(recipe.passes):
        for name in type(step.config).model_fields:
            value = getattr(step.config, name)
            if isinstance(value, ModelSpec):
                out.append((("passes", i, step.name, name), value))
    return out
