"""Compare mmopt's memory estimates with CUDA measurements over a matrix of models and shapes.

    python scripts/validate_estimator.py                      # on a CUDA machine: estimate + measure
    python scripts/validate_estimator.py --estimate-only      # anywhere: estimates only (no GPU needed)
    python scripts/validate_estimator.py --estimate-only --quick   # a three-case smoke run (used by a test)
    python scripts/validate_estimator.py --only 'resnet|bert' --json out.json

Targets (issue 5): inference peak activation within max(10%, 8 MiB) of the CUDA-measured peak for >= 90% of
cases; training step peaks (weights included) within 15%. All weights are random (architectures from configs,
nothing downloaded): memory does not depend on weight values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
INFER_REL, INFER_ABS, TRAIN_REL, PASS_SHARE = 0.10, 8 * MIB, 0.15, 0.90


@dataclasses.dataclass(frozen=True)
class Case:
    model: str          # a key of MODELS
    part: str
    mode: str           # inference | train
    batch: int
    dtype: str = "float32"
    seq_len: int = 128
    image_size: int | None = None
    amp: str | None = None
    grad_ckpt: bool = False

    @property
    def label(self) -> str:
        shape = f"{self.image_size or 'native'}px" if self.part == "visual" else f"seq {self.seq_len}"
        extra = (f" amp {self.amp}" if self.amp else "") + (" ckpt" if self.grad_ckpt else "")
        return f"{self.model}/{self.part} {self.mode} b{self.batch} {self.dtype} {shape}{extra}"


def _hf_folder(kind: str) -> str:
    """A folder with only config.json: the hf adapter builds random weights from it (no download)."""
    from transformers import BertConfig, CLIPConfig, DistilBertConfig

    config = {"bert-base": BertConfig, "distilbert": DistilBertConfig, "clip": CLIPConfig}[kind]()
    folder = Path(tempfile.mkdtemp(prefix=f"mmopt-validate-{kind}-"))
    config.save_pretrained(folder)
    return str(folder)


# model key -> (spec for memory.profile.open_model or a callable giving it, parts, image part takes other sizes)
MODELS = {
    "ViT-B-32": ("open_clip:ViT-B-32", ["visual", "text"], False),
    "ViT-B-16": ("open_clip:ViT-B-16", ["visual", "text"], False),
    "ViT-L-14": ("open_clip:ViT-L-14", ["visual", "text"], False),
    "RN50": ("open_clip:RN50", ["visual", "text"], False),
    "MobileCLIP-S1": ("open_clip:MobileCLIP-S1", ["visual", "text"], False),
    "bert-base": (lambda: _hf_folder("bert-base"), ["text"], False),
    "distilbert": (lambda: _hf_folder("distilbert"), ["text"], False),
    "hf-clip": (lambda: _hf_folder("clip"), ["visual", "text"], False),
    "resnet50": ("torchvision:resnet50", ["visual"], True),
    "resnet18": ("torchvision:resnet18", ["visual"], True),
    "mobilenet_v3_large": ("torchvision:mobilenet_v3_large", ["visual"], True),
}


def matrix() -> list[Case]:
    cases = []
    for key, (_, parts, any_size) in MODELS.items():
        for part in parts:
            if part == "text" and not key.startswith(("bert", "distil", "hf-")):
                shapes = [{"seq_len": 77}]      # open_clip text: its context length (77) is the shape
            elif part == "text":
                shapes = [{"seq_len": 128}, {"seq_len": 512}]
            elif any_size:
                shapes = [{"image_size": 224}, {"image_size": 512}]
            else:
                shapes = [{}]
            for shape in shapes:
                for batch in (1, 16, 64):
                    for dtype in ("float32", "float16"):
                        cases.append(Case(key, part, "inference", batch, dtype, **shape))
                for amp, ckpt in ((None, False), ("bf16", False), (None, True), ("bf16", True)):
                    cases.append(Case(key, part, "train", 16, "float32", amp=amp, grad_ckpt=ckpt, **shape))
    return cases


QUICK = [Case("resnet18", "visual", "inference", 1, image_size=224),
         Case("distilbert", "text", "inference", 1, seq_len=128),
         Case("resnet18", "visual", "train", 1, image_size=224)]


def run_case(case: Case, models: dict, measure: bool) -> dict:
    import torch

    from mmopt.core import Shapes
    from mmopt.memory import tracing
    from mmopt.memory.estimator import Estimator
    from mmopt.memory.profile import ProfileRequest, open_model

    key = (case.model, case.dtype)
    if key not in models:
        spec = MODELS[case.model][0]
        adapter, model = open_model(spec() if callable(spec) else spec)
        if case.dtype != "float32":
            from mmopt.passes import cast
            from mmopt.passes.base import Context

            cast.Cast(cast.CastConfig(dtype=case.dtype)).apply(model, Context(adapter=adapter))
        if measure:
            model.module.to("cuda")
        models.clear()                          # one model in memory at a time
        models[key] = (adapter, model)
    adapter, model = models[key]
    req = ProfileRequest(model=case.model, part=case.part, train=case.mode == "train", amp=case.amp,
                         grad_ckpt=case.grad_ckpt)
    est = Estimator(model, adapter, case.part, req)
    shapes = Shapes(batch_size=case.batch, image_size=case.image_size, seq_len=case.seq_len)
    row = {"case": case.label, "mode": case.mode}
    start = time.perf_counter()
    if case.mode == "inference":
        row["estimate"] = est.inference(shapes, amp=case.amp)["peak_activation_bytes"]
    else:
        row["estimate"] = est.training(shapes)["peak_total_bytes"]
    row["estimate_s"] = round(time.perf_counter() - start, 1)
    if measure:
        torch.cuda.empty_cache()
        if case.mode == "inference":
            row["measured"] = tracing.part_runtime(model, adapter, case.part, shapes, latency="off")[
                "peak_activation_bytes"]
        else:
            row["measured"] = est.training(shapes, measure=True)["peak_total_bytes"]
        row["rel_error"] = (row["estimate"] - row["measured"]) / row["measured"] if row["measured"] else 0.0
        error = abs(row["estimate"] - row["measured"])
        row["ok"] = (error <= max(INFER_REL * row["measured"], INFER_ABS) if case.mode == "inference"
                     else error <= TRAIN_REL * row["measured"])
    if case.grad_ckpt:     # checkpointing cannot be switched off again: rebuild for the next case
        models.clear()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate-only", action="store_true", help="no CUDA: print the estimates alone")
    parser.add_argument("--quick", action="store_true", help="three small cases")
    parser.add_argument("--only", help="regex on the case label")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    measure = not args.estimate_only
    if measure and not torch.cuda.is_available():
        print("error: no CUDA device here; use --estimate-only for the estimates alone", file=sys.stderr)
        return 2
    cases = QUICK if args.quick else matrix()
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.label)]
    rows, models = [], {}
    for case in cases:
        try:
            row = run_case(case, models, measure)
        except Exception as exc:  # one model that cannot be built here (a missing timm) must not stop the table
            row = {"case": case.label, "mode": case.mode, "error": f"{type(exc).__name__}: {str(exc)[:80]}"}
            models.clear()
        rows.append(row)
        print(_line(row, measure), flush=True)
    print(_summary(rows, measure))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:9.1f}"


def _line(row: dict, measure: bool) -> str:
    if "error" in row:
        return f"{row['case']:<58} error: {row['error']}"
    text = f"{row['case']:<58} est {_mib(row['estimate'])} MiB ({row['estimate_s']:>5.1f}s)"
    if measure:
        text += f"  measured {_mib(row['measured'])} MiB  {row['rel_error']:+7.1%}  {'ok' if row['ok'] else 'MISS'}"
    return text


def _summary(rows: list[dict], measure: bool) -> str:
    done = [r for r in rows if "error" not in r]
    failed = len(rows) - len(done)
    if not measure:
        return f"{len(done)} cases estimated, {failed} could not be built here; no CUDA comparison (--estimate-only)"
    lines = []
    for mode, target in (("inference", f"max({INFER_REL:.0%}, {INFER_ABS / MIB:.0f} MiB), target {PASS_SHARE:.0%} "
                                       "of cases"),
                         ("train", f"{TRAIN_REL:.0%}")):
        sub = [r for r in done if r["mode"] == mode]
        if sub:
            share = sum(r["ok"] for r in sub) / len(sub)
            lines.append(f"{mode}: {sum(r['ok'] for r in sub)}/{len(sub)} within {target} ({share:.0%})")
    return "\n".join(lines + [f"{failed} cases could not be built"])


if __name__ == "__main__":
    sys.exit(main())
