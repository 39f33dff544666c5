"""Time and resident memory of `mmopt optimize` on models that are large for a small CPU machine (issue #15).

Each recipe runs in a fresh process (`python -m mmopt optimize --json`); the table gives the stage times from
the report (load, measure, passes, write, reference outputs, reload, fidelity), the wall time, and the process's
peak resident memory (ru_maxrss of the child) against the model's float32 weight bytes.

ViT-L-14 and ViT-bigG-14 have no weights on this machine: random weights are written to a safetensors file once
(cached; bigG: 10 GB of disk), so the runs load from a file as a user's would. The bigG recipes stream (`--stream`):
2.5B parameters of float32 do not fit beside the libraries in this machine's free memory. Targets (2-core CPU): ViT-L-14 cast float16 <= 3 min, int8 <= 5 min,
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
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "measure original", "passes", "write", "reference outputs", "reload", "measure optimized",
          "fidelity")


def random_open_clip_weights(cache: Path, name: str) -> Path:
    """Random open_clip ``name`` weights in a safetensors file (made once, tensor by tensor: ViT-bigG-14's 10 GB
    never sit in memory)."""
    path = cache / f"open_clip_{name.lower().replace('-', '_')}_random.safetensors"
    if not path.exists():
        import open_clip
        import torch

        from mmopt.weights import write_streamed

        with torch.device("meta"):
            shapes = open_clip.create_model(name, device="meta").state_dict()
        generator = torch.Generator().manual_seed(0)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_streamed(tmp, {k: (v.dtype, tuple(v.shape)) for k, v in shapes.items()},
                       lambda key: torch.randn(shapes[key].shape, generator=generator) * 0.02)
        tmp.rename(path)
    return path


def recipes(cache: Path) -> dict[str, Callable[[], tuple[str, list[str]]]]:
    """name -> a function giving (recipe text without output, extra command-line options); weights files are
    made only for the recipes run."""
    def clip(name: str, passes: str, options: list[str]) -> Callable[[], tuple[str, list[str]]]:
        return lambda: (f"model: {{source: open_clip, name: {name}, weights: {random_open_clip_weights(cache, name)}}}\n"
                        f"profile: {{batch_size: 8}}\npasses:\n  - {passes}\n", options)

    return {
        "vit-l-14-fp16": clip("ViT-L-14", "cast: {dtype: float16}", []),
        "vit-l-14-fp16-streamed": clip("ViT-L-14", "cast: {dtype: float16}", ["--stream"]),
        "vit-l-14-int8": clip("ViT-L-14", "quantize: {method: int8}", []),
        "vit-l-14-int8-streamed": clip("ViT-L-14", "quantize: {method: int8}", ["--stream"]),
        # 2.5B parameters, 10 GB of float32: more than this machine's free memory once libraries are loaded
        "vit-bigg-14-fp16-streamed": clip("ViT-bigG-14", "cast: {dtype: float16}", ["--stream"]),
        "vit-bigg-14-int8-streamed": clip("ViT-bigG-14", "quantize: {method: int8}", ["--stream"]),
        "resnet50-features-fp16": lambda: ((ROOT / "configs" / "resnet50-features-fp16.yaml").read_text(), []),
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
        for name, make in chosen.items():
            rows.append(run_one(name, *make(), Path(tmp)))
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
