"""The corpus of bad inputs in tests/bad_inputs/: each exits 2 with at most two lines, no traceback, and
writes nothing. Plus fuzzing of the recipe loader: nothing but a clean RecipeError ever comes out."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmopt import cli
from mmopt.errors import RecipeError
from mmopt.recipe import parse_recipe

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))
NO_HEADER = {"empty.yaml": "the recipe is empty"}


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[:1]
    if first and first[0].startswith("# expect: "):
        return first[0][len("# expect: "):]
    return NO_HEADER[path.name]


def lay_out(folder: Path) -> None:
    """The files the corpus recipes point at."""
    import torch
    from safetensors.torch import save

    (folder / "empty_folder").mkdir()
    blob = save({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    (folder / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (folder / "notes.txt").write_text("these are notes, not weights\n")
    (folder / "blank.txt").write_text("\n   \n\n")
    (folder / "broken_images").mkdir()
    (folder / "broken_images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    shutil.copy2(case, tmp_path / case.name)
    lay_out(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["mmopt", "optimize", str(tmp_path / case.name)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert info.value.code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: ") and "Traceback" not in err
    assert expectation(case) in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


KEYS = st.sampled_from(["model", "source", "path", "name", "passes", "cast", "dtype", "output", "gates",
                        "profile", "batch_size", "calibration", "texts", "parts", "strip", "keep", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["hf", "open_clip", "float16", "ViT-B-32", "-1MiB"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
@example({"passes": ["\n"]})          # a pass named by a line break: its error message stays one line
def test_fuzzed_recipe_structures_fail_cleanly(data):
    import yaml

    try:
        parse_recipe(yaml.safe_dump(data), where="fuzz.yaml")
    except RecipeError as exc:
        # one line per problem, each saying where it is
        assert all(line.startswith("fuzz.yaml") for line in exc.message.splitlines())


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_recipe_text_fails_cleanly(text):
    try:
        parse_recipe(text, where="fuzz.yaml")
    except RecipeError as exc:
        assert exc.message.startswith("fuzz.yaml")


# Found only with the model loaded: its layer count, its part's calibration inputs, torchvision's model list.
NEEDS_THE_MODEL = {"layer_drop_beyond_layers", "layer_choice_without_images", "unknown_torchvision"}


@pytest.mark.parametrize("case", [c for c in CASES if c.stem not in NEEDS_THE_MODEL], ids=lambda p: p.stem)
def test_validate_refuses_what_optimize_would(case, tmp_path, monkeypatch, capsys):
    """``mmopt validate`` passes no recipe that ``optimize`` then rejects for a reason visible without weights."""
    shutil.copy2(case, tmp_path / case.name)
    lay_out(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mmopt", "validate", str(tmp_path / case.name)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    _, err = capsys.readouterr()
    assert info.value.code == 2, err
    assert err.startswith("error: ") and expectation(case) in err.splitlines()[0] and "Traceback" not in err
