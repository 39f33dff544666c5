"""Recipe validation: every problem is one RecipeError naming the file, line and key path."""
from __future__ import annotations

import pytest

from mmopt.errors import RecipeError
from mmopt.recipe import parse_recipe

GOOD = """\
model: {source: hf, path: ./m}
passes:
  - cast: {dtype: float16}
output: out
"""


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, where="r.yaml")
    return info.value.message


def test_good_recipe_parses_passes_into_their_configs():
    recipe = parse_recipe(GOOD, where="r.yaml")
    assert recipe.model.source == "hf"
    assert [p.name for p in recipe.passes] == ["cast"]
    assert recipe.passes[0].config.dtype == "float16"
    assert recipe.profile.batch_size == 32


def test_misspelled_top_level_key_names_key_and_line():
    assert error_of(GOOD + "gatse: {}\n") == "r.yaml:5: gatse: unknown field"


def test_misspelled_pass_option_names_the_path():
    text = GOOD.replace("{dtype: float16}", "{dtpye: float16}")
    assert error_of(text) == "r.yaml:3: passes[0].cast.dtpye: unknown field"


def test_unknown_pass():
    text = GOOD.replace("cast:", "shrink:")
    msg = error_of(text)
    assert msg.startswith("r.yaml:3: passes[0].shrink: unknown pass, known: ")
    assert "cast" in msg and "strip" in msg


def test_wrong_type_says_what_it_got():
    text = GOOD + "seed: many\n"
    msg = error_of(text)
    assert msg.startswith("r.yaml:5: seed: ") and "'many'" in msg


def test_bad_dtype_value():
    msg = error_of(GOOD.replace("float16}", "float8}"))
    assert msg.startswith("r.yaml:3: passes[0].cast.dtype: ") and "float8" in msg


def test_malformed_yaml_gives_line():
    msg = error_of("model: {source: hf\noutput: [\n")
    assert msg.startswith("r.yaml:") and "malformed YAML" in msg


def test_empty_and_non_mapping_recipes():
    assert "empty" in error_of("")
    assert "top level must be a mapping" in error_of("- a\n- b\n")


def test_missing_required_fields():
    assert error_of("model: {source: hf, path: x}\n").splitlines() == [
        "r.yaml:1: output: required field is missing",
        "r.yaml:1: passes: at least one pass is needed (e.g. `passes: [{cast: {dtype: float16}}]`)"]
    assert error_of("model: {source: hf, path: x}\noutput: o\n").startswith(
        "r.yaml:1: passes: at least one pass is needed")
    assert "needs path" in error_of("model: {source: hf}\noutput: o\n")
    assert "needs name" in error_of("model: {source: open_clip}\noutput: o\n")


def test_unknown_source_and_negative_sizes():
    assert "source" in error_of("model: {source: onnx, name: x}\noutput: o\n")
    msg = error_of(GOOD + "profile: {batch_size: -4}\n")
    assert msg.startswith("r.yaml:5: profile.batch_size: ")


def test_gate_sizes_parse_units():
    recipe = parse_recipe(GOOD + "gates: {max_weight_bytes: 2MiB, min_cosine: 0.9}\n", where="r.yaml")
    assert recipe.gates.max_weight_bytes == 2 * 1024 * 1024
    assert "size" in error_of(GOOD + "gates: {max_weight_bytes: lots}\n")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    recipe = parse_recipe(GOOD, where="r.yaml", base_dir=tmp_path)
    assert recipe.output_path == tmp_path / "out"
