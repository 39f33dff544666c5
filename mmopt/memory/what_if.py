"""``profile --what-if``: the memory each technique would reach for this part at these shapes, and the mmopt
pass or option that delivers it, sorted by saving.

Rows are estimated by running the estimator on the transformed model or shapes (a float16 copy, a rebuild at
a lower resolution, a smaller batch, autocast, checkpointing, offload, frame windows). int8 / nf4 are counted
from element sizes (``counting.part_quantized_bytes``) with the float16 activations: "weights only", since the
quantized kernels' own workspaces are not modelled.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Callable

from mmopt.adapters.structure import uncheckpoint_blocks
from mmopt.core import Shapes, is_image_part
from mmopt.errors import UnsupportedError, first_line
from mmopt.memory import counting

if TYPE_CHECKING:
    from mmopt.memory.estimator import Estimator


def _row(technique: str, how: str, total: int | None, baseline: int, note: str = "") -> dict:
    saving = None if total is None else baseline - total
    return {"technique": technique, "peak_total_bytes": total, "saving_bytes": saving,
            "saving_share": None if total is None or not baseline else round(saving / baseline, 4),
            "how": how, "note": note}


def _half_copy(est: Estimator, dtype: str) -> Estimator:
    """An estimator for a copy of the model with ``est.part`` cast to ``dtype`` by the cast pass."""
    from mmopt.passes.base import Context
    from mmopt.passes.cast import Cast, CastConfig

    model = copy.deepcopy(est.model)
    uncheckpoint_blocks(model.module)      # the copy's training estimate re-wraps its own blocks
    Cast(CastConfig(dtype=dtype, parts=[est.part])).apply(model, Context(adapter=est.adapter))
    return est.for_model(model)


def _lower_size(est: Estimator, shapes: Shapes) -> int:
    side = shapes.image_size or est.model.preprocess.get("image_size") or 224
    return max(32, (side * 3 // 4) // 32 * 32)


def table(est: Estimator, shapes: Shapes, described: dict) -> list[dict]:
    """The what-if rows for ``est``'s part, the baseline first, then by saving (rows that do not apply last)."""
    req = est.req
    base = described["peak_total_bytes"]
    train = req.train
    rows = []

    def half(dtype: str) -> tuple[int, Estimator]:
        e = _half_copy(est, dtype)
        return e.total(shapes), e

    fp16_total, fp16_est = half("float16")
    bf16_total, _ = half("bfloat16")
    current = req.dtype or str(est.model.part_dtype(est.part)).removeprefix("torch.")   # None: as stored
    if current != "float16":
        rows.append(_row("float16 weights", "cast pass {dtype: float16}", fp16_total, base,
                         "pure float16 training needs loss scaling" if train else ""))
    if current != "bfloat16":
        rows.append(_row("bfloat16 weights", "cast pass {dtype: bfloat16}", bf16_total, base))
    if not train:
        fp16_inf = fp16_est.inference(shapes)
        for method in ("int8", "nf4"):
            weights = counting.part_quantized_bytes(est.model, est.part, method, keep_dtype="float16")
            total = weights + fp16_inf["input_bytes"] + fp16_inf["peak_activation_bytes"]
            rows.append(_row(f"{method} weights", f"quantize pass {{method: {method}}}", total, base,
                             "weights only (activations as float16)"))
    else:
        rows.append(_row("int8 / nf4 weights", "quantize pass", None, base,
                         "weights only; training through quantized weights (adapters) is not modelled"))
    side = shapes.image_size or est.model.preprocess.get("image_size") or 224
    if is_image_part(est.part) and _lower_size(est, shapes) < side:
        size = _lower_size(est, shapes)
        try:
            e = est.for_model(est.adapter.at_image_size(est.model, size))
            rows.append(_row(f"resolution {size}px", f"resolution pass (to {size}px; fine-tune after)",
                             e.total(dataclasses.replace(shapes, image_size=size)), base))
        except Exception as exc:  # an architecture fixed to its size: say so in the row, do not fail the table
            rows.append(_row(f"resolution {size}px", "resolution pass", None, base, f"not estimated: {exc}"))
    if shapes.batch_size > 1:
        smaller = shapes.batch_size // 2
        total, note = _attempt(lambda: est.total(dataclasses.replace(shapes, batch_size=smaller)))
        rows.append(_row(f"batch {smaller}", f"--batch {smaller} (runtime.auto_batch_size backs off on OOM)",
                         total, base, note))
    if train:
        if req.amp is None:
            for amp in ("bf16", "fp16"):
                rows.append(_row(f"AMP {amp}", f"--amp {amp} (torch.autocast)",
                                 est.training(shapes, amp=amp)["peak_total_bytes"], base))
        if req.optimizer != "sgd":
            rows.append(_row("SGD instead of AdamW", "--optimizer sgd", est.training(shapes, optimizer="sgd")
                             ["peak_total_bytes"], base, "one state per weight instead of two"))
        rows.append(_row("CPU offload", "--offload cpu", None, base, "inference only"))
        if not req.grad_ckpt:  # last: turning checkpointing on cannot be undone on this model
            total = _safe(lambda: est.training(shapes, grad_ckpt=True)["peak_total_bytes"])
            rows.append(_row("gradient checkpointing", "--grad-ckpt (the model's own checkpointing)", total, base,
                             "" if total is not None else "this model has no checkpointing switch"))
    else:
        rows.append(_row("gradient checkpointing", "--train --grad-ckpt", None, base,
                         "training only"))
        if req.amp is None:
            rows.append(_row("AMP bf16", "--amp bf16 (torch.autocast)",
                             est.inference(shapes, amp="bf16")["peak_total_bytes"], base,
                             "float32 weights, bfloat16 activations"))
        if not req.offload:
            inf = est.inference(shapes, amp=req.amp, offload=True)
            rows.append(_row("CPU offload", "--offload cpu / runtime.load_offloaded",
                             inf["trace"].offload_peak_bytes + inf["input_bytes"], base,
                             "GPU peak; slower"))
    if is_image_part(est.part) and not train:
        window = req.window or max(1, shapes.batch_size // 4)
        if window < shapes.batch_size:
            frames = est.frames(shapes, shapes.batch_size, window)
            rows.append(_row(f"streaming frames (window {window})", f"--frames N --window {window} / "
                             "runtime.encode_frames", frames["windowed_bytes"], base,
                             f"{frames['windows']} windows of {window} images"))
    rows.sort(key=lambda r: (r["saving_bytes"] is None, -(r["saving_bytes"] or 0), r["technique"]))
    return [_row("as profiled", "-", base, base)] + rows


def _attempt(fn: Callable[[], int]) -> tuple[int | None, str]:
    """(value, "") or (None, why): a row the model cannot run at (batch norm at batch 1) says so."""
    try:
        return fn(), ""
    except (RuntimeError, ValueError) as exc:
        return None, f"not estimated: {first_line(exc, 80)}"


def _safe(fn: Callable[[], int]) -> int | None:
    try:
        return fn()
    except UnsupportedError:
        return None
