"""scripts/try_as_new_user.sh, the scripted new-user walk: its command-line mistakes part runs here (the recipes
part is what tests/test_configs_run.py checks in-process); a command that misbehaves makes it fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "try_as_new_user.sh"


def walk(mmopt: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "MMOPT": mmopt}
    return subprocess.run(["bash", str(SCRIPT), "--mistakes-only"], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_mistakes_a_new_user_makes_get_documented_exit_codes_and_one_line_messages():
    result = walk(f"{sys.executable} -m mmopt.cli")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout and "FAIL" not in result.stdout


def test_the_walk_fails_when_a_command_misbehaves():
    result = walk("false")
    assert result.returncode == 1 and "FAIL" in result.stdout
