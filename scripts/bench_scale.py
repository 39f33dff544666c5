"""Time and resident memory of `mmopt optimize` on models that are large for a small CPU machine (issue #15).

Each recipe runs in a fresh process (`python -m mmopt optimize --json`); the table gives the stage times from
the report (load, measure, passes, write, reference outputs, reload, fidelity), the wall time, and the process's
peak resident memory (ru_maxrss of the child) against the model's float32 weight bytes.

ViT-L-14 has no weights on this machine: random weights are written to a safetensors file once (cached), so the
runs load from a file as a user's would. Targets (2-core CPU): ViT-L-14 cast float16 <= 3 min, int8 <= 5 min,
configs/resnet50-features-fp16.yaml <= 90 s, peak RSS of cast / strip / quantize <= 1.6x the fp32 weights.

    python scripts/bench_scale.py [--only vit-l-14-fp16,...] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "measure original", "passes", "write", "reference outputs", "reload", "measure optimized",
          "fidelity")


def vit_l_14_weights(cache: Path) -> Path:
    """Random open_clip ViT-L-14 weights in a safetensors file (made once, tensor by tensor)."""
    path = cache / "open_clip_vit_l_14_random.safetensors"
    if not path.exists():
        import open_clip
        import torch

        from mmopt.weights import write_streamed

        with torch.device("meta"):
            shapes = open_clip.create_model("ViT-L-14", device="meta").state_dict()
        generator = torch.Generator().manual_seed(0)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_streamed(tmp, {k: (v.dtype, tuple(v.shape)) for k, v in shapes.items()},
                       lambda key: torch.randn(shapes[key].shape, generator=generator) * 0.02)
        tmp.rename(path)
    return path


def recipes(cache: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe text without output, extra command-line options)."""
    clip = (f"model: {{source: open_clip, name: ViT-L-14, weights: {vit_l_14_weights(cache)}}}\n"
            "profile: {batch_size: 8}\n")
    return {
        "vit-l-14-fp16": (clip + "passes:\n  - cast: {dtype: float16}\n", []),
        "vit-l-14-fp16-streamed": (clip + "passes:\n  - cast: {dtype: float16}\n", ["--stream"]),
        "vit-l-14-int8": (clip + "passes:\n  - quantize: {method: int8}\n", []),
        "vit-l-14-int8-streamed": (clip + "passes:\n  - quantize: {method: int8}\n", ["--stream"]),
        "resnet50-features-fp16": ((ROOT / "configs" / "resnet50-features-fp16.yaml").read_text(), []),
    }


# The child runs the CLI in-process and writes its own peak RSS on the way out, whatever the exit.
CHILD = """
import resource, sys
from mmopt.cli import main
try:
    sys.argv = ["mmopt", *sys.argv[2:]]
    main()
finally:
    with open(RSS_FILE, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def run_one(name: str, text: str, options: list[str], work: Path) -> dict:
    recipe = work / f"{name}.yaml"
    lines = [ln for ln in text.splitlines() if not ln.startswith("output:")]
    recipe.write_text("\n".join(lines + [f"output: {work / name}"]) + "\n")
    rss_file = work / f"{name}.rss"
    child = CHILD.replace("RSS_FILE", repr(str(rss_file)))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child, "-", "optimize", str(recipe), "--json", "--force", *options],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    report = json.loads(proc.stdout)
    return {"name": name, "wall_s": round(wall, 1), "stages": report.get("stages", {}),
            "peak_rss": int(rss_file.read_text()), "weights": report["totals"]["before"]["weight_bytes"],
            "cosine": {p: (d["fidelity"] or {}).get("mean_cosine") for p, d in report["parts"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated recipe names")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("MMOPT_BENCH_CACHE",
                                                                           Path.home() / ".cache" / "mmopt-bench")))
    args = parser.parse_args()
    chosen = recipes(args.cache)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (text, options) in chosen.items():
            rows.append(run_one(name, text, options, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    header = ["recipe", *STAGES, "wall s", "peak RSS / fp32 weights", "cosine"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | error: {row['error']} |")
            continue
        rss = f"{row['peak_rss'] / 2**20:.0f} MiB = {row['peak_rss'] / row['weights']:.2f}x"
        cells = [row["name"], *(f"{row['stages'].get(s, 0):.1f}" for s in STAGES), f"{row['wall_s']:.1f}", rss,
                 ", ".join(f"{p} {c}" for p, c in row["cosine"].items() if c is not None)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
