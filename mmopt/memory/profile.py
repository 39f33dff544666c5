"""``profile``: where a model's memory goes, per part and module, and its inference peak at given shapes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmopt import registry
from mmopt.core import Model, Shapes, is_image_part
from mmopt.errors import UnsupportedError, UserError
from mmopt.memory import tracing, training
from mmopt.memory.cuda_runtime import OneTime, cublas_workspace
from mmopt.memory.estimator import Estimator

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter


@dataclass(frozen=True)
class ProfileRequest:
    model: str
    weights: str | None = None
    part: str | None = None
    batch_size: int = 1
    image_size: int | None = None
    seq_len: int = 128
    dtype: str | None = None            # cast to this first; None: as stored (an fp16 output stays fp16)
    train: bool = False                 # estimate a training step instead of an inference forward
    optimizer: str = "adamw"            # adamw | sgd (training)
    amp: str | None = None              # bf16 | fp16: autocast (training and inference)
    grad_ckpt: bool = False             # the model's own gradient checkpointing (training)
    budget: int | str | None = None     # "8GiB": find the largest batch that fits
    offload: str | None = None          # "cpu": weights in CPU memory, each block moved to the GPU to run
    frames: int | None = None           # video-style input through an image part: N frames ...
    window: int | None = None           # ... encoded K at a time
    what_if: bool = False               # the table of techniques and the memory each reaches
    measure: bool = False               # also run on CUDA and put the measurement beside the estimate


def open_model(spec: str, weights: str | None = None) -> tuple[Adapter, Model]:
    """(adapter, model) for ``SOURCE:REST`` (``open_clip:ARCH``, ``hf:PATH``, ``torchvision:NAME``: the adapter
    reads REST), an mmopt checkpoint folder, or a Hugging Face folder."""
    from mmopt import checkpoint

    source, sep, rest = spec.partition(":")
    if sep and source in registry.ADAPTERS and not Path(spec).exists():
        adapter = registry.adapter_for(source)
        return adapter, adapter.load(adapter.parse_spec(rest, weights))
    path = Path(spec)
    if path.is_dir() and (path / checkpoint.MANIFEST).is_file():
        model = checkpoint.load_model(path)
        return registry.adapter_for(model.source), model
    if path.is_dir() and (path / "config.json").is_file():     # a plain folder is a Hugging Face one
        adapter = registry.adapter_for("hf")
        return adapter, adapter.load(adapter.parse_spec(spec, weights))
    if path.exists():
        raise UserError(f"{spec}: not an mmopt checkpoint or Hugging Face folder (no mmopt.json or config.json)")
    raise UserError(f"model {spec!r}: give open_clip:ARCH, hf:PATH, torchvision:NAME, timm:NAME or a local folder",
                    hint="nothing is downloaded: hub ids must be local folders")


def check_request(req: ProfileRequest) -> int | None:
    """Reject bad option combinations before any model loads; return the budget in bytes (or None)."""
    from mmopt.units import parse_bytes

    if req.dtype not in (None, "float32", "float16", "bfloat16"):
        raise UserError(f"--dtype: expected float32, float16 or bfloat16, got {req.dtype!r}")
    training.check_options(training.TrainOptions(req.optimizer, req.amp, req.grad_ckpt))
    if req.batch_size < 1:
        raise UserError(f"--batch: expected a positive batch size, got {req.batch_size}")
    if req.grad_ckpt and not req.train:
        raise UserError("--grad-ckpt applies to training: add --train")
    if req.offload not in (None, "cpu"):
        raise UserError(f"--offload: expected cpu, got {req.offload!r}")
    if req.offload and req.train:
        raise UnsupportedError("--offload is modelled for inference only; drop --train")
    if (req.frames is None) != (req.window is None):
        raise UserError("--frames and --window go together: give both (e.g. --frames 64 --window 8)")
    if req.frames is not None:
        if req.frames < 1 or req.window < 1:
            raise UserError(f"--frames/--window: expected positive counts, got {req.frames}/{req.window}")
        if req.frames < req.window:
            raise UserError(f"--frames ({req.frames}) is smaller than --window ({req.window}): "
                            "a window cannot hold more frames than the video has")
    if req.measure and not _cuda():
        raise UnsupportedError("--measure needs CUDA, and no CUDA device is available here",
                               hint="drop --measure for the estimate alone")
    if req.budget is None:
        return None
    try:
        budget = parse_bytes(req.budget)
    except ValueError as exc:
        raise UserError(f"--budget: {exc}") from None
    if budget <= 0:
        raise UserError(f"--budget: expected a positive size, got {req.budget!r}")
    return budget


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def profile(req: ProfileRequest) -> dict:
    """Profile ``req.model``: weights per module, inference (or training) peak at the shapes, and whatever of
    budget / offload / frames / what-if / measure the request asks for. Returns a JSON-able dict."""
    budget = check_request(req)
    adapter, model = open_model(req.model, req.weights)
    if req.dtype is not None and req.dtype != _stored_dtype(model):
        from mmopt.passes.base import Context
        from mmopt.passes.cast import Cast, CastConfig

        Cast(CastConfig(dtype=req.dtype)).apply(model, Context(adapter=adapter))
    parts = [req.part] if req.part else list(model.parts)
    for part in parts:
        model.check_part(part)
    if req.frames is not None:
        if req.part and not is_image_part(req.part):
            raise UnsupportedError(f"--frames needs an image part; {req.part!r} takes text")
        if not any(is_image_part(p) for p in parts):
            raise UnsupportedError("--frames needs an image part; this model has none")
    if _cuda():
        model.module.to("cuda")
    shapes = Shapes(batch_size=req.batch_size, image_size=req.image_size, seq_len=req.seq_len)
    out_parts = {}
    for part in parts:
        out_parts[part] = Estimator(model, adapter, part, req).describe(shapes, budget)
    methods = {p["method"] for p in out_parts.values()}
    weights = sum(p["weights_bytes"] for p in out_parts.values())
    # What running a part adds to the weights resident (all parts loaded): its activations and inputs.
    running = {part: p["peak_total_bytes"] - p["weights_bytes"] for part, p in out_parts.items()}
    largest = max(running, key=running.get)
    result = {
        "model": req.model,
        "random_weights": bool(model.random_weights),
        "method": tracing.overall_method(methods),
        "mode": "train" if req.train else "inference",
        "dtype": _stored_dtype(model, parts),
        "shapes": {"batch_size": req.batch_size,
                   "image_size": (req.image_size or model.preprocess.get("image_size"))
                   if any(is_image_part(p) for p in parts) else None,
                   "seq_len": max((_tokens(adapter, model, p, req.seq_len) for p in parts if not is_image_part(p)),
                                  default=None)},
        "inputs": {part: (f"{_tokens(adapter, model, part, req.seq_len)} tokens" if not is_image_part(part) else
                          f"{req.image_size or model.preprocess.get('image_size')} px images")
                   for part in parts},
        "weights_bytes": weights,
        # Parts run one at a time (an image or a text embedding): every part's weights stay resident, and the
        # largest part's activations come on top. Running them together costs all activations at once.
        "peak_activation_bytes": max(p["peak_activation_bytes"] for p in out_parts.values()),
        "peak_total_bytes": weights + running[largest],
        "peak_part": largest,
        "parts": out_parts,
    }
    if len(parts) > 1:
        result["peak_total_all_parts_at_once_bytes"] = weights + sum(running.values())
    result["one_time"] = [dataclasses.asdict(_cublas_workspace())]
    if req.train:
        result["train"] = {"optimizer": req.optimizer, "amp": req.amp, "grad_ckpt": req.grad_ckpt, "steps": 2}
    return result


def _cublas_workspace() -> OneTime:
    """The cuBLAS workspace the first matmul allocates on the GPU this runs on (or, without one, a Hopper-class
    GPU): once per process, so it is its own line and not part of any batch's peak."""
    import torch

    capability = torch.cuda.get_device_capability() if _cuda() else None
    return cublas_workspace(capability)


def _stored_dtype(model: Model, parts: list[str] | None = None) -> str:
    """The dtype the parts compute in ("float16", or "float16 / float32" when they differ)."""
    names = dict.fromkeys(str(model.part_dtype(p)).removeprefix("torch.") for p in (parts or model.parts))
    return " / ".join(names)


def _tokens(adapter: Adapter, model: Model, part: str, seq_len: int) -> int:
    """The sequence length ``part`` really runs (CLIP text: its context length, 77, whatever was asked)."""
    return int(adapter.example_inputs(model, part, Shapes(batch_size=1, seq_len=seq_len))[0].shape[-1])
