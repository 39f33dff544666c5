"""Determinism, integrity and interruption: what a CI job relies on."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmopt
from mmopt import cli

RESNET = """\
model: {source: torchvision, name: resnet18}
profile: {batch_size: 1, image_size: 32}
calibration: {num_samples: %d, batch_size: 2}
passes: [{strip: {features: true}}, {cast: {dtype: bfloat16}}]   # bfloat16: fast on CPUs, float16 is not
gates: {min_cosine: %s}
output: out
"""


def test_two_runs_write_byte_identical_weights(tmp_path):
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        recipe = tmp_path / name / "r.yaml"
        recipe.write_text(RESNET % (4, 0.9))
        mmopt.optimize(recipe)
        outputs.append(tmp_path / name / "out")
    a, b = (json.loads((o / "mmopt.json").read_text()) for o in outputs)
    assert a["files"] == b["files"]
    assert (outputs[0] / "visual.safetensors").read_bytes() == (outputs[1] / "visual.safetensors").read_bytes()


def test_check_reevaluates_gates_and_refuses_tampering(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESNET % (4, 0.9))
    mmopt.optimize(recipe)
    assert (tmp_path / "out" / "report.png").is_file()
    report = mmopt.api.check(recipe)
    assert report["passed"] and report["gates"][0]["gate"] == "min_cosine"

    recipe.write_text((RESNET % (4, 0.9)).replace("min_cosine: 0.9", "min_cosine: 0.9, max_size_ratio: 0.01"))
    monkeypatch.setattr(sys, "argv", ["mmopt", "optimize", "--check", str(recipe)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, _ = capsys.readouterr()
    assert info.value.code == 1 and "max_size_ratio" in out and "FAIL" in out

    weights = tmp_path / "out" / "visual.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    for argv in (["optimize", "--check", str(recipe)], ["profile", str(tmp_path / "out")]):
        monkeypatch.setattr(sys, "argv", ["mmopt", *argv])
        with pytest.raises(SystemExit) as info:
            cli.main()
        _, err = capsys.readouterr()
        assert info.value.code == 2 and "visual.safetensors does not match its sha256" in err


def test_check_refuses_an_output_another_recipe_made(tmp_path, monkeypatch, capsys):
    """Changing the recipe (cast bfloat16 -> float16) and running --check must not judge the old output; a gate
    changed alone is what --check is for, and still judges it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESNET % (4, 0.9))
    mmopt.optimize(recipe)
    manifest = json.loads((tmp_path / "out" / "mmopt.json").read_text())
    assert len(manifest["recipe"]["sha256"]) == 64
    assert manifest["recipe"]["identity"]["passes"][1]["cast"]["dtype"] == "bfloat16"
    recipe.write_text((RESNET % (4, 0.9)).replace("min_cosine: 0.9", "min_cosine: 0.5"))
    assert mmopt.api.check(recipe)["passed"]

    recipe.write_text((RESNET % (4, 0.9)).replace("dtype: bfloat16", "dtype: float16"))
    for extra in ([], ["--set", "passes.1.cast.dtype=bfloat16", "--set", "seed=1"]):
        monkeypatch.setattr(sys, "argv", ["mmopt", "optimize", "--check", str(recipe), *extra])
        with pytest.raises(SystemExit) as info:
            cli.main()
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == "" and len(err.splitlines()) == 1
        assert "made by a different recipe" in err
        assert ("passes[1].cast.dtype: \"bfloat16\" -> \"float16\"" if not extra else "seed: 0 -> 1") in err


def test_impossible_gate_exits_1_with_its_report(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((RESNET % (4, 0.5)).replace("min_cosine: 0.5", "min_cosine: 0.5, max_size_ratio: 0.01"))
    monkeypatch.setattr(sys, "argv", ["mmopt", "optimize", str(recipe)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "GATE FAILED" in md.splitlines()[0] and "| max_size_ratio | all |" in md and "**FAIL**" in md


def _interrupt_midway(tmp_path: Path, sig: int, force: bool) -> subprocess.CompletedProcess:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESNET % (64, 0.9))
    cmd = [sys.executable, "-m", "mmopt.cli", "optimize", str(recipe)] + (["--force"] if force else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".out.mmopt-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_no_output(tmp_path, sig):
    result = _interrupt_midway(tmp_path, sig, force=False)
    assert result.returncode == 130 and "interrupted" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_interrupted_forced_run_keeps_the_previous_output(tmp_path):
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "mmopt.json").write_text("{}")
    result = _interrupt_midway(tmp_path, signal.SIGTERM, force=True)
    assert result.returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]
    assert [p.name for p in previous.iterdir()] == ["mmopt.json"] and (previous / "mmopt.json").read_text() == "{}"
