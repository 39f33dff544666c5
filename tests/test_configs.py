"""Every example recipe in configs/ validates (paths aside, which may name packages or random weights)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmopt.recipe import load_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_recipes():
    names = {p.name for p in CONFIGS}
    assert {"minilm-fp16.yaml", "clip-visual-fp16.yaml", "resnet50-features-fp16.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.passes, f"{path.name} has no passes"
    assert recipe.output_path.parent.name == "out"
