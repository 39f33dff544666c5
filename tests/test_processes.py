"""Distillation in several processes (``--processes N``, ``accelerate launch``): two gloo processes on the CPU give
the single process's result, only rank 0 writes and prints, and a failing rank fails the run with nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmopt import api
from mmopt.processes import strip_option
from tests.conftest import save_tiny_bert
from tests.passes.test_substitute_student import TEXTS as STUDENT_TEXTS
from tests.passes.test_substitute_student import tiny_student_dir  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red blue green small large quick slow happy sad old new bright dark cold warm".split()
NOUNS = "cat dog car house tree river city book phone chair".split()
# Key biases get no gradient at all (softmax is invariant to a constant added to every score): what AdamW makes
# of their rounding noise differs between runs that add the same numbers in another order, and changes no output.
NO_GRADIENT = (".attention.self.key.bias",)


@pytest.fixture(scope="module")
def sensitive_bert(tmp_path_factory) -> Path:
    """A tiny random BERT whose output depends on its FFNs (initializer_range 0.5; the shared tiny BERT's outputs
    barely change when half its FFN goes), so recovery really trains: cosine 0.72 -> 0.85 on the texts below."""
    return save_tiny_bert(tmp_path_factory.mktemp("sensitive_bert"), initializer_range=0.5)


def _recipe(folder: Path, model: Path, output: str) -> Path:
    import random

    rng = random.Random(0)
    (folder / "texts.txt").write_text("".join(
        f"the {rng.choice(WORDS)} {rng.choice(NOUNS)} near the {rng.choice(WORDS)} {rng.choice(NOUNS)} was "
        f"{rng.choice(WORDS)}\n" for _ in range(40)))
    # No lr: the range test runs, and must choose the same rate in both processes. match: output (one cosine per
    # sample) makes a 2-process step the 1-process step exactly, up to the order in which floats are added. No
    # refit: it would leave training too little to compare. A float32 student: under bfloat16 autocast (auto on
    # AMX CPUs) half a batch rounds differently from the whole one, and the curves part by ~1e-3, which says
    # nothing about the sharding this test checks.
    path = folder / f"{output}.yaml"
    path.write_text(f"""model: {{source: hf, path: {model}}}
calibration: {{texts: texts.txt, num_samples: 40}}
profile: {{batch_size: 2, seq_len: 16}}
passes:
  - prune: {{target: mlp, amount: 0.5, recover: {{steps: 12, batch_size: 8, eval_every: 4, patience: null,
                                                 match: output, refit: false, train_precision: float32}}}}
output: {output}
""")
    return path


def _mmopt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mmopt", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})})


def _recovery(report: dict) -> dict:
    return report["passes"][0]["metrics"]["text"]["recovery"]


def test_two_processes_give_the_single_process_result_and_only_rank_0_writes_and_prints(tmp_path, sensitive_bert):
    from safetensors.torch import load_file

    one = api.optimize(_recipe(tmp_path, sensitive_bert, "one"))
    result = _mmopt("optimize", str(_recipe(tmp_path, sensitive_bert, "two")), "--processes", "2", "--json")
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)        # exactly one JSON document: rank 1 printed nothing
    a, b = _recovery(one), _recovery(two)
    assert a["lr_source"] == "range test" and a["held_out"] == b["held_out"]
    assert (a["lr"], a["steps"], a["best_step"]) == (b["lr"], b["steps"], b["best_step"])
    assert a["curve"][-1][1] > a["curve"][0][1] + 0.05          # it really trained
    # Same global batches, same rate: what differs is float rounding (reductions split across two processes,
    # one thread each here, two in this one), about 1e-7 relative per step, far below these bounds.
    for (step_a, cos_a), (step_b, cos_b) in zip(a["curve"], b["curve"]):
        assert step_a == step_b and cos_b == pytest.approx(cos_a, abs=1e-4)
    cos = [r["parts"]["text"]["fidelity"]["mean_cosine"] for r in (one, two)]
    assert cos[1] == pytest.approx(cos[0], abs=1e-4)
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        if not key.endswith(NO_GRADIENT):
            assert (wa[key] - wb[key]).abs().max() < 1e-4, key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.yaml", "texts.txt", "two", "two.yaml"]


def test_a_student_with_its_own_tokenizer_trains_alike_in_two_processes(tmp_path, tiny_bert_dir, tiny_student_dir):
    """Its batches hold two tokenizations (the student's, the original's), shared out alike; the projection's
    least-squares refit solves on every process's rows."""
    from safetensors.torch import load_file

    (tmp_path / "texts.txt").write_text("\n".join(STUDENT_TEXTS * 2) + "\n")
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(f"""model: {{source: hf, path: {tiny_bert_dir}}}
calibration: {{texts: texts.txt}}
profile: {{batch_size: 2, seq_len: 16}}
passes:
  - substitute: {{student: {{source: hf, path: {tiny_student_dir}}},
                  distill: {{steps: 12, lr: 1.0e-3, batch_size: 8, eval_every: 4, patience: null}}}}
output: {name}
""")
    one = api.optimize(tmp_path / "one.yaml")
    result = _mmopt("optimize", str(tmp_path / "two.yaml"), "--processes", "2", "--json")
    assert result.returncode in (0, 1), result.stderr        # 1: a gate of the tiny random pair may fail
    two = json.loads(result.stdout)
    a, b = (r["passes"][0]["metrics"]["text"]["substitute"]["distill"] for r in (one, two))
    assert [s for s, _ in a["curve"]] == [s for s, _ in b["curve"]] == [0, 4, 8, 12]
    for (_, cos_a), (_, cos_b) in zip(a["curve"], b["curve"]):
        assert cos_b == pytest.approx(cos_a, abs=1e-4)
    ra, rb = a["projection_refit"], b["projection_refit"]
    assert ra["samples"] == rb["samples"] == 12 * 8
    assert ra["kept"] == rb["kept"]
    assert rb["held_out_after"] == pytest.approx(ra["held_out_after"], abs=1e-4)
    wa, wb = (load_file(tmp_path / n / "2_Dense" / "model.safetensors") for n in ("one", "two"))
    assert all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa)


def test_a_failing_process_fails_the_run_and_nothing_is_written(tmp_path, sensitive_bert):
    hook = tmp_path / "hook"
    hook.mkdir()
    # Rank 1 alone fails as its distillation starts; rank 0 is then waiting for it.
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mmopt.distill\n"
        "    def _fail(*args, **kwargs):\n"
        "        raise ValueError('injected failure of rank 1')\n"
        "    mmopt.distill.distill = _fail\n")
    recipe = _recipe(tmp_path, sensitive_bert, "out")
    path = os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "mmopt", "optimize", str(recipe), "--processes", "2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode != 0
    assert "injected failure of rank 1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook", "out.yaml", "texts.txt"]


def test_processes_option_is_refused_where_nothing_trains_and_stripped_for_the_workers(tmp_path, sensitive_bert):
    result = _mmopt("optimize", str(_recipe(tmp_path, sensitive_bert, "out")), "--processes", "2", "--dry-run")
    assert result.returncode == 2 and "--dry-run and --check train nothing" in result.stderr
    assert not (tmp_path / "out").exists()
    assert strip_option(["optimize", "r.yaml", "--processes", "2", "--json"]) == ["optimize", "r.yaml", "--json"]
    assert strip_option(["optimize", "--processes=4", "r.yaml"]) == ["optimize", "r.yaml"]
