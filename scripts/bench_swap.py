"""A real teacher -> real student swap against the issue-13 target: all-mpnet-base-v2 (768-d) replaced by
all-MiniLM-L6-v2 (384-d) + a trained projection; one JSON line per run.

    python scripts/bench_swap.py [--steps 400] [--lr RATE] [--judge dev] [--out DIR] [--json FILE] [--reuse]

Calibration: the 400 Python standard-library docstring sentences ``bench_distill.py`` uses (one domain), widened
by the engine's augmentation. The recipe is written as a user would (``substitute: {part: text, student: {source:
hf, path: MiniLM}, distill: {steps: N}}``; ``--lr`` adds a rate). Judged after the run, on the written folder
loaded by stock sentence-transformers, against the TEACHER's embeddings: ``--judge eval`` on the held-aside
scripts/data/everyday_eval.txt (300 sentences) and paraphrase_eval.tsv (120 pairs), ``--judge dev`` on the
development sentences (scripts/data/everyday_dev.txt and paraphrase_dev.tsv, or ``--dev DIR``), the only data
choices are made on. ``training.curve`` is the run's own held-out split (docstrings) at each check; runs with other ``--steps`` give the judged curve.
``--reuse`` judges the output an earlier run with the same options wrote (its report.json) without running
again: a setting chosen on the development sentences is judged on the held-aside ones as it was chosen.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_distill import MINILM, emit, paraphrase_hits  # noqa: E402
from bench_substitute import corpus  # noqa: E402
from fetch_assets import fetch  # noqa: E402

TARGET_MEAN_COS = 0.85
TARGET_WEIGHT_RATIO = 0.25
TARGET_SECONDS = 600


def judged_data(judge: str, dev: Path) -> tuple[list[str], list[tuple[str, str]]]:
    folder, texts_name, pairs_name = ((HERE / "data", "everyday_eval.txt", "paraphrase_eval.tsv") if judge == "eval"
                                      else (dev, "everyday_dev.txt", "paraphrase_dev.tsv"))
    texts = [t.strip() for t in (folder / texts_name).read_text().splitlines() if t.strip()]
    pairs = [tuple(line.split("\t")[:2]) for line in (folder / pairs_name).read_text().splitlines() if "\t" in line]
    return texts, pairs


def judge_folder(teacher_path: Path, out: Path, texts: list[str], pairs: list) -> dict:
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(teacher_path), device="cpu")
    student = SentenceTransformer(str(out), device="cpu")       # a stock load of the written folder
    ref = torch.as_tensor(teacher.encode(texts, normalize_embeddings=True))
    emb = torch.as_tensor(student.encode(texts, normalize_embeddings=True))
    cos = (ref * emb).sum(-1)
    return {"mean_cos": round(float(cos.mean()), 4), "min_cos": round(float(cos.min()), 4),
            "paraphrase_teacher": paraphrase_hits(teacher, pairs), "paraphrase_student": paraphrase_hits(student, pairs),
            "pairs": len(pairs), "sentences": len(texts), "modules": [type(m).__name__ for m in student]}


def run(args, work: Path, teacher_path: Path, calib_file: Path) -> dict:
    from mmopt import api
    from mmopt.report import PlainProgress

    distill = f"steps: {args.steps}" + (f", lr: {args.lr}" if args.lr else "")
    passes = f"substitute: {{part: text, student: {{source: hf, path: \"{MINILM}\"}}, distill: {{{distill}}}}}"
    name = f"swap-{args.steps}" + (f"-lr{args.lr:g}" if args.lr else "")
    out, recipe = work / name, work / f"{name}.yaml"
    recipe.write_text(f'model: {{source: hf, path: "{teacher_path}"}}\n'
                      f"calibration: {{texts: {calib_file}, num_samples: 400}}\n"
                      f"passes:\n  - {passes}\noutput: {out}\ndevice: cpu\n")
    cpu0, wall0 = _cpu(), time.perf_counter()
    if args.reuse:
        report = json.loads((out / "report.json").read_text())
    else:
        report = api.optimize(recipe, force=True, progress=PlainProgress(sys.stderr))
    cpu, wall = (_cpu() - cpu0, time.perf_counter() - wall0) if not args.reuse else (None, None)
    texts, pairs = judged_data(args.judge, args.dev)
    summary = report["passes"][0]["metrics"]["text"]["substitute"]
    training = summary.get("distill") or {}
    weights = {k: report["parts"]["text"][k]["weight_bytes"] for k in ("before", "after")}
    return {"recipe": passes, "judged_on": args.judge, **judge_folder(teacher_path, out, texts, pairs),
            "target_mean_cos": TARGET_MEAN_COS, "weights": weights,
            "weight_ratio": round(weights["after"] / weights["before"], 4), "target_weight_ratio": TARGET_WEIGHT_RATIO,
            "cpu_s": cpu and round(cpu), "wall_s": wall and round(wall), "run_s": report["seconds"],
            "target_seconds": TARGET_SECONDS, "stages": report["stages"],
            "report_fidelity_heldout": report["parts"]["text"]["fidelity"]["mean_cosine"],
            "projection_fit": summary["student"]["projection_fit"],
            "training": {k: training.get(k) for k in ("lr", "lr_source", "steps", "best_step", "stopped_early",
                                                      "held_out_before", "held_out_best", "augment", "curve",
                                                      "first_loss", "final_loss", "teacher_labels", "seconds",
                                                      "projection_refit")
                         if k in training}}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=None, help="a given rate (default: the engine's range test)")
    parser.add_argument("--judge", choices=["eval", "dev"], default="eval")
    parser.add_argument("--dev", type=Path, default=HERE / "data")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", type=Path, default=None, help="where outputs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="append the row here")
    parser.add_argument("--reuse", action="store_true", help="judge the output already in --out; do not run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    teacher_path = fetch(("mpnet",))["mpnet"]
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, _ = corpus(400, 0)
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n".join(calib) + "\n")
    row = {"label": args.label, **run(args, work, teacher_path, calib_file)}
    emit(row, args.json)


if __name__ == "__main__":
    main()
