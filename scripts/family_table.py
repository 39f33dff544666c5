"""Run the family matrix (tests/family_matrix.py) and write the README's model table from it.

    python scripts/family_table.py            # run every cell; write the table if each does what is declared
    python scripts/family_table.py --no-run   # only re-render the table from the declarations

The table is rendered from the matrix's declarations, never from a run: a cell that behaves otherwise is
printed and the README is left as it is (fix the code, or the declaration in tests/family_matrix.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.family_matrix import (EXPECTED, PASSES, README_END, README_START, SOURCES, YES,  # noqa: E402
                                 run_cell, table)


def run_all() -> list[str]:
    """Every cell, in a scratch folder; the lines that differ from the declarations."""
    wrong = []
    with tempfile.TemporaryDirectory(prefix="family-matrix-") as tmp:
        for source in SOURCES:
            for column in PASSES:
                start = time.perf_counter()
                try:
                    got = run_cell(source, column, Path(tmp))
                except Exception as exc:  # a crash is a finding, not the end of the run
                    got = f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                expected = EXPECTED[source][column]
                ok = got == YES if expected == YES else expected in got
                print(f"{source:16} {column:14} {time.perf_counter() - start:5.1f}s {'ok' if ok else 'WRONG'}: "
                      f"{got}", flush=True)
                if not ok:
                    wrong.append(f"{source} x {column}: declared {expected!r}, got {got!r}")
    return wrong


def write_readme(readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + table() + text[end:], encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="re-render from the declarations without running")
    args = parser.parse_args()
    if not args.no_run:
        wrong = run_all()
        if wrong:
            print("\n".join(["cells that differ from tests/family_matrix.py (README left as it is):", *wrong]),
                  file=sys.stderr)
            return 1
    write_readme(ROOT / "README.md")
    print(f"wrote the model table into {ROOT / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
