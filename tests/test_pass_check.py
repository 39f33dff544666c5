"""Pass.check: every pass's preconditions are checked on the loaded model before anything is measured, so a
recipe that cannot work fails in seconds and before any progress line (tests/test_bad_inputs.py relies on it)."""
from __future__ import annotations

import pytest

import mmopt
from mmopt import pipeline
from mmopt.errors import DataError, UserError


@pytest.fixture
def nothing_measured(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("measured before every pass was checked")

    monkeypatch.setattr(pipeline, "measure_parts", measure)


def test_layer_choice_without_images_fails_before_measuring(tiny_clip_name, recipe_file, nothing_measured):
    path = recipe_file(f"""
model: {{source: open_clip, name: {tiny_clip_name}}}
passes:
  - cast: {{dtype: bfloat16, parts: [text]}}
  - substitute: {{part: visual, layer_drop: {{layers: 1}}}}
output: out
""")
    with pytest.raises(DataError, match=r"substitute.layer_drop.layers: part 'visual' needs calibration data"):
        mmopt.optimize(path)
    assert not (path.parent / "out").exists()


def test_layer_indices_beyond_the_model_fail_before_measuring(tiny_bert_dir, recipe_file, nothing_measured):
    path = recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
passes: [{{substitute: {{layer_drop: {{keep: [0, 5]}}}}}}]
output: out
""")
    with pytest.raises(UserError, match=r"part 'text' has layers 0-1"):
        mmopt.optimize(path)
    with pytest.raises(UserError, match=r"part 'text' has layers 0-1"):      # --dry-run checks too
        mmopt.api.plan(path)


def test_prune_target_the_part_lacks_fails_before_measuring(recipe_file, nothing_measured):
    path = recipe_file("""
model: {source: torchvision, name: resnet18}
passes: [{prune: {target: heads, amount: 0.5}}]
output: out
""")
    with pytest.raises(UserError, match=r"prune: part 'visual' of this model has no heads to prune"):
        mmopt.optimize(path)
