"""report.json version 2: each pass's metrics under its own entry, briefs in the table, version 1 still checked."""
from __future__ import annotations

import json

import pytest

import mmopt
from mmopt.errors import UserError
from mmopt.report import markdown, pass_metrics, table_rows

TWO_RESIZES = """\
model: {source: torchvision, name: resnet18}
profile: {batch_size: 1, image_size: 32}
calibration: {num_samples: 4, batch_size: 2}
passes: [{resolution: {image_size: 64}}, {resolution: {image_size: 48}}]
gates: {min_cosine: -1}
output: out
"""


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    recipe = folder / "r.yaml"
    recipe.write_text(TWO_RESIZES)
    return recipe, mmopt.optimize(recipe)


def test_two_passes_of_one_kind_keep_their_own_metrics(optimized):
    _, report = optimized
    assert report["report_version"] == 2
    assert [p["metrics"]["visual"]["image_size"] for p in report["passes"]] == [
        {"before": 224, "after": 64}, {"before": 64, "after": 48}]
    assert [m["image_size"]["after"] for m in pass_metrics(report, "visual", "resolution")] == [64, 48]
    assert set(report["parts"]["visual"]) == {"before", "after", "fidelity"}      # nothing merged in flat


def test_the_table_has_a_row_per_pass_in_its_own_words(optimized):
    _, report = optimized
    rows = [row for row in table_rows(report) if row[1] == "resolution"]
    assert [row[3] for row in rows] == ["input 224 -> 64 px", "input 64 -> 48 px"]
    assert "| visual | resolution |  | input 64 -> 48 px |  |" in markdown(report)


def test_check_reads_a_version_1_report(optimized):
    recipe, report = optimized
    out = recipe.parent / "out" / "report.json"
    # version 1 merged each pass's metrics into its part, the last pass of a kind winning
    old = json.loads(out.read_text())
    old["report_version"] = 1
    old["parts"]["visual"]["image_size"] = {"before": 64, "after": 48}
    out.write_text(json.dumps(old))
    checked = mmopt.api.check(recipe)
    assert checked["passed"] and [g["gate"] for g in checked["gates"]] == ["min_cosine"]

    old["report_version"] = 7
    out.write_text(json.dumps(old))
    with pytest.raises(UserError, match="report version 7, expected one of 1, 2"):
        mmopt.api.check(recipe)


def test_a_pass_without_its_own_brief_lists_its_metrics_in_words():
    from mmopt.passes.base import Pass, PassConfig

    class Plain(Pass):
        name = "plain"
        Config = PassConfig

        def apply(self, model, ctx):
            raise NotImplementedError

    metrics = {"image_size": {"before": 224, "after": 64}, "zeroed": 12, "share": 0.123456, "kept": [0, 4, 5]}
    assert Plain(PassConfig()).brief(metrics) == "image size 224 -> 64; zeroed 12; share 0.1235; kept [0, 4, 5]"
    with pytest.raises(TypeError, match="Plain takes a PassConfig"):
        Plain({"zeroed": 12})
