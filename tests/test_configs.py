"""Every example recipe in configs/ would run: it validates, its model exists offline and has the parts the
recipe names, and every pass it lists is a registered Pass class."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from mmopt import registry
from mmopt.core import ModelSpec
from mmopt.passes.base import Pass, PassConfig
from mmopt.paths import resolve_spec
from mmopt.recipe import Recipe, load_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def model_parts(spec: ModelSpec) -> tuple[str, ...]:
    """The parts of the model ``spec`` names, loaded from local files (random weights where none are given)."""
    return tuple(registry.adapter_for(spec.source).load(spec).parts)


def named_parts(recipe: Recipe) -> set[str]:
    """Every part the recipe names: ``parts:``, each pass's ``parts`` / ``part`` / ``keep``, per-part gates."""
    names = set(recipe.parts or []) | set(recipe.gates.parts)
    for step in recipe.passes:
        for field in ("parts", "keep", "part"):
            value = getattr(step.config, field, None)
            names |= {value} if isinstance(value, str) else set(value or [])
    return names


def test_the_demo_recipes_are_there():
    assert {"minilm-fp16.yaml", "clip-visual-fp16.yaml", "resnet50-features-fp16.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_recipe_would_run(path):
    recipe = load_recipe(path)
    assert recipe.output_path.parent == path.resolve().parent / "out"
    parts = model_parts(resolve_spec(recipe.model, recipe.base_dir))
    assert named_parts(recipe) <= set(parts), f"{path.name} names parts its {recipe.model.source} model lacks"
    for step in recipe.passes:
        assert type(step) is registry.pass_class(step.name)
        assert isinstance(step.config, step.Config)


@pytest.mark.parametrize("name", sorted(registry.PASSES))
def test_every_registered_pass_is_a_class_with_a_strict_config(name):
    cls = registry.pass_class(name)
    assert issubclass(cls, Pass) and cls.name == name
    assert issubclass(cls.Config, PassConfig)
    assert cls.Config.model_config["extra"] == "forbid" and cls.Config.model_config["frozen"]
