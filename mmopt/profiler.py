"""``profile``: where a model's memory goes, per part and module, and its inference peak at given shapes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmopt import memory, measure, registry
from mmopt.adapters.base import Shapes
from mmopt.errors import UserError


@dataclass(frozen=True)
class ProfileRequest:
    model: str
    weights: str | None = None
    part: str | None = None
    batch_size: int = 1
    image_size: int | None = None
    seq_len: int = 128
    dtype: str = "float32"


def open_model(spec: str, weights: str | None = None) -> tuple[Any, Any]:
    """(adapter, model) for ``open_clip:ARCH``, ``hf:PATH``, ``torchvision:NAME`` or a folder."""
    from mmopt import checkpoint
    from mmopt.recipe import ModelSpec

    source, sep, rest = spec.partition(":")
    if sep and source in registry.ADAPTERS and not Path(spec).exists():
        if source == "hf":
            if weights:
                raise UserError("--weights is for open_clip and torchvision models; an hf folder holds its own")
            model_spec = ModelSpec(source="hf", path=rest)
        else:
            model_spec = ModelSpec(source=source, name=rest, weights=weights)
        adapter = registry.adapter_for(source)
        return adapter, adapter.load(model_spec)
    path = Path(spec)
    if path.is_dir() and (path / checkpoint.MANIFEST).is_file():
        model = checkpoint.load_model(path)
        return registry.adapter_for(model.source), model
    if path.is_dir() and (path / "config.json").is_file():
        adapter = registry.adapter_for("hf")
        return adapter, adapter.load(ModelSpec(source="hf", path=str(path)))
    if path.exists():
        raise UserError(f"{spec}: not an mmopt checkpoint or Hugging Face folder (no mmopt.json or config.json)")
    raise UserError(f"model {spec!r}: give open_clip:ARCH, hf:PATH, torchvision:NAME or a local folder",
                    hint="nothing is downloaded: hub ids must be local folders")


def profile(req: ProfileRequest) -> dict:
    import torch

    adapter, model = open_model(req.model, req.weights)
    if req.dtype != "float32":
        from mmopt.passes import cast
        from mmopt.passes.base import Context

        cast.apply(model, cast.Config(dtype=req.dtype), Context(adapter=adapter))
    parts = [req.part] if req.part else list(model.parts)
    for part in parts:
        model.check_part(part)
    if torch.cuda.is_available():
        model.module.to("cuda")
    shapes = Shapes(batch_size=req.batch_size, image_size=req.image_size, seq_len=req.seq_len)
    out_parts = {}
    for part in parts:
        sizes = measure.part_sizes(model, part)
        runtime = measure.part_runtime(model, adapter, part, shapes, latency=False)
        out_parts[part] = {"params": sizes["params"], "weights_bytes": sizes["weight_bytes"],
                           "peak_activation_bytes": runtime["peak_activation_bytes"],
                           "input_bytes": runtime["input_bytes"], "method": runtime["memory_method"],
                           "modules": memory.module_table(model, part)}
    methods = {p["method"] for p in out_parts.values()}
    return {
        "model": req.model,
        "random_weights": bool(model.random_weights),
        "method": "measured-cuda" if methods == {"measured-cuda"} else "estimated",
        "dtype": req.dtype,
        "shapes": {"batch_size": req.batch_size, "image_size": req.image_size or model.preprocess.get("image_size"),
                   "seq_len": req.seq_len},
        "weights_bytes": sum(p["weights_bytes"] for p in out_parts.values()),
        # Parts run one at a time (an image or a text embedding), so the peak is the largest part's.
        "peak_activation_bytes": max(p["peak_activation_bytes"] for p in out_parts.values()),
        "parts": out_parts,
    }
