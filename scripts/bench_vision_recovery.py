"""MobileNetV2 (real ImageNet weights) with 30% of its channels pruned, before and after recovery, judged on photos
no run has seen; the issue-13 target is top-1 agreement >= 0.85 with the original.

    python scripts/bench_vision_recovery.py [--steps N] [--exclude GLOB ...] [--label L] [--out DIR] [--json FILE]

The 28 photos of scripts/fetch_assets.py, sorted by name: the first 20 are the recipe's calibration images (the
pipeline holds 4 of them out for its report, the recovery another 3 for its held-out curve, and the engine
augments the rest), the last 8 are read only here, after the runs. Both models (the pruned one without recovery,
and with ``recover: {steps: N}``) are judged on those 8 photos, loaded from the written outputs with
``mmopt.load`` and preprocessed as torchvision's ImageNet weights expect (resize 256, centre crop 224), against
the original torchvision model: top-1 agreement and the cosine of the 1000 logits. One JSON line per model.

Choices (which layers to prune, steps) are made on ``calib_views``: the same two measures on 4 augmented views of
each of the 20 calibration photos (the engine's own crops, flips, jitter and mixes, drawn with another seed than
training's), never on the 8. ``--reuse`` judges outputs already in ``--out`` again without re-running them.
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
from bench_distill import emit  # noqa: E402
from fetch_assets import fetch  # noqa: E402

CALIBRATION = 20
TARGET_TOP1 = 0.85
VIEWS = 4           # augmented views of each calibration photo, for choices
VIEW_SEED = 1234    # not the training's seed (0): other crops and jitter than the ones trained on


def split_photos(folder: Path, work: Path) -> tuple[Path, list[Path]]:
    """(a folder of the first 20 photos by name, the 8 others)."""
    photos = sorted(folder.glob("*.jpg"))
    calib = work / "calibration"
    calib.mkdir(exist_ok=True)
    for photo in photos[:CALIBRATION]:
        target = calib / photo.name
        if not target.exists():
            target.symlink_to(photo)
    return calib, photos[CALIBRATION:]


def calibration_views(folder: Path) -> torch.Tensor:
    """VIEWS augmented views of every calibration photo, preprocessed as the unseen ones."""
    from mmopt.distill.augment import augment_images

    photos = unseen_batch(sorted(folder.glob("*.jpg")))
    gen = torch.Generator().manual_seed(VIEW_SEED)
    return torch.cat([augment_images(photos, gen, ratio=1.0) for _ in range(VIEWS)])


def unseen_batch(photos: list[Path]) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    prep = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.stack([prep(Image.open(p).convert("RGB")) for p in photos])


def judge(original: torch.nn.Module, out: Path, images: torch.Tensor, views: torch.Tensor) -> dict:
    import mmopt

    model = mmopt.load(out).eval()
    return {**agreement(original, model, images), "calib_views": agreement(original, model, views)}


def agreement(original: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor) -> dict:
    with torch.no_grad():
        ref = torch.cat([original(chunk) for chunk in images.split(16)])
        new = torch.cat([model(chunk) for chunk in images.split(16)])
    cos = torch.nn.functional.cosine_similarity(ref, new, dim=-1)
    same = ref.argmax(-1) == new.argmax(-1)
    return {"top1_agreement": round(float(same.float().mean()), 4), "agree": f"{int(same.sum())}/{len(same)}",
            "logit_cos_mean": round(float(cos.mean()), 4), "logit_cos_min": round(float(cos.min()), 4)}


def run(name: str, prune: str, work: Path, weights: Path, calib: Path, reuse: bool,
        processes: int = 1) -> tuple[Path, dict, float | None, float | None]:
    from mmopt import api
    from mmopt.report import PlainProgress

    out = work / name
    if reuse and (out / "report.json").is_file():
        return out, json.loads((out / "report.json").read_text()), None, None
    recipe = work / f"{name}.yaml"
    recipe.write_text(f"model: {{source: torchvision, name: mobilenet_v2, weights: {weights}}}\n"
                      f"calibration: {{images: {calib}, num_samples: {CALIBRATION}}}\n"
                      f"passes:\n  - prune: {prune}\noutput: {out}\ndevice: cpu\n")
    cpu0, wall0 = _cpu(), time.perf_counter()
    if processes > 1:       # the command itself, data-parallel (docs/distillation.md#several-processes)
        import subprocess

        done = subprocess.run([sys.executable, "-m", "mmopt", "optimize", str(recipe), "--force", "--processes",
                               str(processes), "--json"], stdout=subprocess.PIPE)
        if done.returncode not in (0, 1):       # 1: a gate failed, the output and report were written
            raise SystemExit(f"mmopt optimize {recipe} exited {done.returncode}")
        report = json.loads(done.stdout)
    else:
        report = api.optimize(recipe, force=True, progress=PlainProgress(sys.stderr))   # a line every 30 s
    return out, report, round(_cpu() - cpu0), round(time.perf_counter() - wall0)


def _cpu() -> float:
    """CPU seconds of this process and of the workers it waited for."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="recover.steps")
    parser.add_argument("--lr", type=float, default=None, help="recover.lr (default: the range test)")
    parser.add_argument("--exclude", nargs="*", default=[], help="prune.exclude globs")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", type=Path, default=None, help="where outputs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="append the rows here")
    parser.add_argument("--reuse", action="store_true", help="judge outputs already in --out, without running")
    parser.add_argument("--processes", type=int, default=1, help="run the recipes as `mmopt optimize --processes N`")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from torchvision.models import mobilenet_v2

    assets = fetch(("mobilenet", "photos"))
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-vision-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, unseen = split_photos(assets["photos"], work)
    original = mobilenet_v2()
    original.load_state_dict(torch.load(assets["mobilenet"], map_location="cpu", weights_only=True))
    original.eval()
    images, views = unseen_batch(unseen), calibration_views(calib)
    lr = f", lr: {args.lr}" if args.lr else ""
    exclude = f", exclude: {json.dumps(args.exclude)}" if args.exclude else ""
    cases = {"pruned": f"{{target: channels, amount: 0.3{exclude}}}",
             "recovered": f"{{target: channels, amount: 0.3{exclude}, recover: {{steps: {args.steps}{lr}}}}}"}
    for name, prune in cases.items():
        out, report, cpu, wall = run(name, prune, work, assets["mobilenet"], calib, args.reuse, args.processes)
        visual = report["parts"]["visual"]
        metrics = report["passes"][0]["metrics"]["visual"]
        recovery = metrics.get("recovery") or {}
        row = {"label": args.label, "case": name, "recipe": f"prune: {prune}",
               **judge(original, out, images, views), "unseen_photos": [p.name for p in unseen],
               "target_top1": TARGET_TOP1, "report_fidelity": visual["fidelity"],
               "gates": report.get("gates"),
               "weights": {k: visual[k]["weight_bytes"] for k in ("before", "after")},
               "training": {k: recovery.get(k) for k in ("lr", "lr_source", "steps", "best_step", "stopped_early",
                                                         "held_out_before", "held_out_best", "curve", "held_out")
                            if k in recovery},
               "cpu_s": cpu, "wall_s": wall}
        emit(row, args.json)


if __name__ == "__main__":
    main()
