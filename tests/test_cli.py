"""The command line: exit codes, exact one-line messages, nothing written on bad input, fast --help."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from mmopt import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mmopt", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, mmopt.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "optimize" in result.stdout and "profile" in result.stdout
    assert time.perf_counter() - start < 5     # generous for a loaded CI box; typically ~0.4 s


BAD = {
    "misspelled key": ("model: {source: hf, path: x}\noutputt: o\n", "recipe.yaml:2: outputt: unknown field"),
    "unknown pass": ("model: {source: hf, path: x}\npasses: [{squash: {}}]\noutput: o\n",
                     "recipe.yaml:2: passes[0].squash: unknown pass"),
    "wrong type": ("model: {source: hf, path: x}\nprofile: {batch_size: big}\npasses: [cast]\noutput: o\n",
                   "recipe.yaml:2: profile.batch_size: "),
    "malformed yaml": ("model: {source: hf, path: x\npasses: [cast]\noutput: o\n", "malformed YAML"),
    "missing model path": ("model: {source: hf, path: ./nowhere}\npasses: [cast]\noutput: o\n", "model path: path does not exist"),
    "hub id": ("model: {source: hf, path: bert-base-uncased/main}\npasses: [cast]\noutput: o\n", "not available offline"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_exit_2_with_one_line_and_write_nothing(case, tmp_path, monkeypatch, capsys):
    text, expected = BAD[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "optimize", "recipe.yaml")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert len(lines) <= 2 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_validate_says_ok(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\npasses: [{cast: {dtype: float16}}]\noutput: o\n")
    code, out, err = run_cli(monkeypatch, capsys, "validate", recipe)
    assert code == 0 and out.startswith(f"ok: {recipe} (torchvision model; cast;")


def test_existing_output_needs_force(tmp_path, monkeypatch, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\npasses: [strip]\noutput: o\n")
    code, _, err = run_cli(monkeypatch, capsys, "optimize", recipe)
    assert code == 2 and err.startswith(f"error: output already exists: {tmp_path / 'o'}\nhint: pass --force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_failed_gate_exits_1_and_still_writes(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\nprofile: {batch_size: 1, image_size: 32}\n"
                      "calibration: {num_samples: 4, batch_size: 2}\npasses: [strip]\ngates: {max_weight_bytes: 1KiB}\n"
                      "output: o\n")
    code, out, _ = run_cli(monkeypatch, capsys, "optimize", recipe, "--json")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    assert [(g["gate"], g["part"], g["passed"]) for g in report["gates"]] == [("max_weight_bytes", "all", False)]
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "mmopt.json").is_file()


def test_profile_json(monkeypatch, capsys, tiny_clip_name):
    code, out, _ = run_cli(monkeypatch, capsys, "profile", f"open_clip:{tiny_clip_name}", "--part", "visual",
                           "--batch", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["method"] == "estimated" and result["random_weights"] is True
    assert result["weights_bytes"] == result["parts"]["visual"]["weights_bytes"] > 0
    assert result["peak_activation_bytes"] > 0 and result["parts"]["visual"]["modules"]


def test_profile_bad_model_is_one_line(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "profile", "hf:/no/such/folder")
    assert code == 2 and err.startswith("error: model path: path does not exist")
