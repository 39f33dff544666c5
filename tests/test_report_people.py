"""What a person reads after a run: every table cell formatted (report.json keeps the raw values), third-party
warnings shown once at most, and outputs that carry nothing named and failing the run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmopt

ROOT = Path(__file__).resolve().parents[1]
# A raw float (0.998639), a JSON dict or list, or a Python repr in a cell is data, not words for a person.
RAW = re.compile(r"\d\.\d{5,}|[{}]|\[['\"]|^\[|True|False|None")


def mmopt_cli(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mmopt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_cells(stdout: str) -> list[list[str]]:
    """The rows of the rich before/after table (box-drawn with │)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in stdout.splitlines()
            if line.count("│") >= 5]


def test_int8_run_and_load_print_each_third_party_warning_once_and_a_table_for_people(tiny_bert_dir, tmp_path):
    """The bitsandbytes int8 method (by its name today) printed 218-482 'MatMul8bitLt' lines a run, and more on
    load; prune and quantize rows printed raw dicts and 6-digit fractions, cosine's 'before' read 1."""
    (tmp_path / "r.yaml").write_text(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
calibration: {{num_samples: 8, batch_size: 4}}
passes:
  - prune: {{target: mlp, amount: 0.5}}
  - quantize: {{method: int8}}
output: out
""")
    result = mmopt_cli("optimize", "r.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("MatMul8bitLt") <= 1, result.stderr
    cells = table_cells(result.stdout)
    assert any(row[1].startswith("prune") for row in cells) and any(row[1].startswith("quantize") for row in cells)
    for row in cells:
        assert not any(RAW.search(cell) for cell in row[2:]), row
    cosine = next(row for row in cells if row[1].startswith("cosine"))
    assert cosine[2] == "-"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    quantize = next(p for p in report["passes"] if p["name"] == "quantize")
    assert isinstance(quantize["metrics"]["text"]["quantized_fraction"], float)     # raw in report.json

    load = ("import mmopt, torch\nm = mmopt.load('out').mmopt_model\nfrom mmopt import registry\n"
            "a = registry.adapter_for(m.source)\nfrom mmopt.core import Shapes\n"
            "for i in range(3): a.run(m, 'text', a.example_inputs(m, 'text', Shapes(batch_size=2, seq_len=8)))\n")
    loaded = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr.count("MatMul8bitLt") <= 1, loaded.stderr


def test_nf4_run_prints_third_party_warnings_at_most_once(tiny_bert_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
calibration: {{num_samples: 8, batch_size: 4}}
passes: [{{quantize: {{method: nf4, blocksize: 32}}}}]
output: out
""")
    result = mmopt_cli("optimize", "r.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("gemm_4bit_forward") <= 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "a line repeated on stderr"


def test_degenerate_outputs_are_named_and_fail_the_run(tmp_path):
    """Outputs ~1e-10 become exact zeros in float16: cosine 0 / 0 passed silently with exit 0."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["fc.weight"] = state["fc.weight"] * 1e-12      # logits far below float16's smallest number
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    save_file(state, str(tmp_path / "tiny_logits.safetensors"))
    (tmp_path / "r.yaml").write_text("""
model: {source: torchvision, name: resnet18, weights: tiny_logits.safetensors}
profile: {batch_size: 1, image_size: 32}
calibration: {num_samples: 4, batch_size: 2}
passes: [{cast: {dtype: float16}}]
gates: {min_neighbor_agreement: 0.0}
output: out
""")
    result = mmopt_cli("optimize", "r.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "all-zero outputs for 4 of 4 inputs" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parts"]["visual"]["fidelity"]["degenerate"] == {"optimized": "all-zero outputs for 4 of 4 inputs"}
    failed = {g["gate"] for g in report["gates"] if not g["passed"]}
    assert failed == {"usable_outputs", "min_neighbor_agreement"}     # agreement 0 >= 0.0 fails anyway
    assert "DEGENERATE" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("outputs, expected", [
    ([[1.0, 2.0], [float("nan"), 0.0]], "NaN or infinite outputs for 1 of 2 inputs"),
    ([[0.0, 0.0], [1.0, 0.0]], "all-zero outputs for 1 of 2 inputs"),
    ([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], "the same output for all 3 inputs"),
    ([[1.0, 2.0], [2.0, 1.0]], None),
])
def test_degenerate_outputs_are_recognised(outputs, expected):
    import torch

    from mmopt.fidelity import degenerate

    assert degenerate(torch.tensor(outputs)) == expected


def test_before_is_the_original_whole_even_when_a_pass_drops_a_head(tmp_path):
    """strip features drops ResNet's classifier from the reference too (to compare features): 'before' on disk
    left it out as well, while 'before' in memory had it."""
    (tmp_path / "r.yaml").write_text("""
model: {source: torchvision, name: resnet18}
profile: {batch_size: 1, image_size: 32}
calibration: {num_samples: 4, batch_size: 2}
passes: [{strip: {features: true}}]
output: out
""")
    report = mmopt.optimize(tmp_path / "r.yaml")
    before = report["parts"]["visual"]["before"]
    fc = (512 * 1000 + 1000) * 4
    assert before["weight_bytes"] <= before["checkpoint_bytes"] < before["weight_bytes"] + 64 * 1024
    assert report["parts"]["visual"]["after"]["checkpoint_bytes"] < before["checkpoint_bytes"] - fc + 64 * 1024
