"""Memory estimates of one part at given shapes, and what ``profile`` builds on them: the per-module tree, the
largest batch under a budget, block offload and frame windows. Inference bytes come from ``tracing`` (the
same fake-tensor trace ``optimize`` uses), training bytes from ``training``."""
from __future__ import annotations

import dataclasses
from types import EllipsisType
from typing import TYPE_CHECKING, Callable

from mmopt.adapters.structure import holds_blocks
from mmopt.core import Model, Shapes, is_image_part
from mmopt.errors import UnsupportedError
from mmopt.memory import counting, tracing, training, what_if

if TYPE_CHECKING:
    from torch import nn

    from mmopt.adapters.base import Adapter
    from mmopt.memory.profile import ProfileRequest

MAX_BATCH = 1 << 20      # the budget search stops here: a budget this large is not a memory question


class Estimator:
    """Estimates for ``part`` of ``model`` under the options of a ProfileRequest (train, amp, offload, ...)."""

    def __init__(self, model: Model, adapter: Adapter, part: str, req: ProfileRequest) -> None:
        self.model, self.adapter, self.part, self.req = model, adapter, part, req
        self.weights_bytes = counting.part_weight_bytes(model, part)

    def for_model(self, model: Model) -> "Estimator":
        """The same estimates for another model (a cast copy, a rebuild at another size): what-if rows."""
        return Estimator(model, self.adapter, self.part, self.req)

    # --- one estimate ------------------------------------------------------------------------------------

    def inference(self, shapes: Shapes, amp: str | None = None, tree: bool = False,
                  offload: bool = False) -> dict:
        """Peak activation of one forward (fake-tensor trace), with the module tree / offload when asked."""
        # Real inputs of one row, grown to the batch on fake tensors (nothing real at large batches).
        inputs = self.adapter.example_inputs(self.model, self.part, dataclasses.replace(shapes, batch_size=1))
        modules = [name for name, _ in tree_modules(self.model, self.part)] if tree else None
        blocks = part_blocks(self.model, self.part) if offload else None
        scope = [t for _, t in self.model.named_tensors(self.part)]
        trace = tracing.trace_forward(tracing.part_forward(self.adapter, self.part, amp), self.model, inputs,
                                      modules=modules, blocks=blocks, scope=scope, batch=shapes.batch_size)
        input_bytes = counting.input_bytes(inputs, shapes.batch_size)
        return {"trace": trace, "input_bytes": input_bytes, "peak_activation_bytes": trace.peak_bytes,
                "peak_total_bytes": self.weights_bytes + input_bytes + trace.peak_bytes}

    def training(self, shapes: Shapes, optimizer: str | None = None, amp: str | None | EllipsisType = ...,
                 grad_ckpt: bool | None = None, measure: bool = False) -> dict:
        """A training step's peak; options default to the request's (``amp=None`` turns autocast off)."""
        opts = training.TrainOptions(optimizer or self.req.optimizer,
                                     self.req.amp if amp is ... else amp,
                                     self.req.grad_ckpt if grad_ckpt is None else grad_ckpt)
        return training.estimate(self.model, self.adapter, self.part, shapes, opts, measure=measure)

    def total(self, shapes: Shapes) -> int:
        """Peak bytes at ``shapes`` in the request's mode (weights included): the budget search's measure."""
        if self.req.train:
            return self.training(shapes)["peak_total_bytes"]
        return self.inference(shapes, amp=self.req.amp)["peak_total_bytes"]

    # --- what profile reports for a part -----------------------------------------------------------------

    def describe(self, shapes: Shapes, budget: int | None) -> dict:
        req = self.req
        inf = self.inference(shapes, amp=req.amp, tree=True, offload=bool(req.offload))
        trace = inf["trace"]
        out = {"params": counting.part_params(self.model, self.part), "weights_bytes": self.weights_bytes,
               "peak_activation_bytes": trace.peak_bytes, "input_bytes": inf["input_bytes"],
               "method": tracing.ESTIMATED, "modules": counting.module_table(self.model, self.part),
               "tree": module_tree(self.model, self.part, trace), "peak_total_bytes": inf["peak_total_bytes"]}
        on_cuda = any(t.is_cuda for _, t in self.model.named_tensors(self.part))
        if on_cuda and not req.train:
            measured = tracing.part_runtime(self.model, self.adapter, self.part, shapes, latency="off")
            if req.measure:
                out["measured"] = {"peak_activation_bytes": measured["peak_activation_bytes"],
                                   "estimated_peak_activation_bytes": trace.peak_bytes,
                                   "relative_error": _rel(trace.peak_bytes, measured["peak_activation_bytes"])}
            else:  # on CUDA the reported peak is the measured one; --measure puts the estimate beside it
                out["peak_activation_bytes"] = measured["peak_activation_bytes"]
                out["method"] = measured["memory_method"]
                out["peak_total_bytes"] = self.weights_bytes + inf["input_bytes"] + out["peak_activation_bytes"]
        if req.train:
            train = self.training(shapes)
            out["train"] = train
            out["peak_total_bytes"] = train["peak_total_bytes"]
            if req.measure:
                real = self.training(shapes, measure=True)
                out["measured"] = {"peak_total_bytes": real["peak_total_bytes"],
                                   "estimated_peak_total_bytes": train["peak_total_bytes"],
                                   "relative_error": _rel(train["peak_total_bytes"], real["peak_total_bytes"])}
        if req.offload:
            out["offload"] = offload_summary(self, inf)
        if req.frames is not None and is_image_part(self.part):
            out["frames"] = self.frames(shapes, req.frames, req.window)
        if budget is not None:
            out["budget"] = self.fit_budget(shapes, budget)
        if req.what_if:
            out["what_if"] = what_if.table(self, shapes, out)
        return out

    # --- budget ------------------------------------------------------------------------------------------

    def smallest_footprint(self) -> tuple[int, str]:
        """The fewest bytes this part's weights can take in mmopt, and how (nf4 quantization, fp16 rest)."""
        nf4 = counting.part_quantized_bytes(self.model, self.part, "nf4", keep_dtype="float16")
        return nf4, "quantize pass method nf4 (Linear weights in 4 bits, the rest in float16)"

    def fit_budget(self, shapes: Shapes, budget: int) -> dict:
        """The largest batch whose estimated peak fits ``budget``: exponential then binary search on the
        estimator, started from a linear guess (activations grow about linearly in the batch)."""
        from mmopt.units import format_bytes

        if self.weights_bytes >= budget:
            small, how = self.smallest_footprint()
            raise UnsupportedError(
                f"--budget {format_bytes(budget)} is below the weights alone ({format_bytes(self.weights_bytes)} "
                f"for {self.part}); the smallest footprint reachable is about {format_bytes(small)} of weights "
                f"with the {how}, plus activations")
        cache: dict[int, int] = {}

        def cost(batch: int) -> int:
            if batch not in cache:
                cache[batch] = self.total(dataclasses.replace(shapes, batch_size=batch))
            return cache[batch]

        if cost(1) > budget:
            raise UnsupportedError(f"--budget {format_bytes(budget)}: not even batch 1 fits "
                                   f"({format_bytes(cost(1))} estimated)",
                                   hint="try --grad-ckpt, --amp bf16, --offload cpu or a smaller dtype")
        lo, hi = search_batch(cost, budget, guess=_linear_guess(cost, budget))
        return {"budget_bytes": budget, "batch_size": lo, "peak_total_bytes": cost(lo),
                "next_batch_bytes": cost(hi) if hi <= MAX_BATCH else None, "estimates_run": len(cache)}

    # --- frames ------------------------------------------------------------------------------------------

    def frames(self, shapes: Shapes, frames: int, window: int) -> dict:
        """All ``frames`` through the image part at once vs ``window`` at a time (windows run one after another;
        the embeddings of finished windows are kept)."""
        at_once = self.inference(dataclasses.replace(shapes, batch_size=frames), amp=self.req.amp)
        windowed = self.inference(dataclasses.replace(shapes, batch_size=window), amp=self.req.amp)
        emb = self.embedding_bytes(shapes)
        windows = -(-frames // window)
        frame_input = at_once["input_bytes"] // frames
        return {"frames": frames, "window": window, "windows": windows,
                "all_at_once_bytes": at_once["peak_total_bytes"],
                # the decoded frames of a window, its activations, and the embeddings kept so far
                "windowed_bytes": self.weights_bytes + window * frame_input + windowed["peak_activation_bytes"]
                + (frames - min(window, frames)) * emb,
                "embedding_bytes_per_frame": emb}

    def embedding_bytes(self, shapes: Shapes) -> int:
        """Bytes of one frame's output embedding (from a fake run at batch 1)."""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        inputs = self.adapter.example_inputs(self.model, self.part, dataclasses.replace(shapes, batch_size=1))
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        copied = tracing.measuring_copy(self.model, mode)
        with mode:
            fake = tracing.fake_inputs(mode, inputs, None)
            with torch.no_grad():
                out = self.adapter.run(copied, self.part, fake)
            return counting.tensor_bytes(out)


def search_batch(cost: Callable[[int], int], budget: int, guess: int = 1) -> tuple[int, int]:
    """(lo, hi) with cost(lo) <= budget < cost(hi) and hi == lo + 1, for a ``cost`` that grows with the batch and
    cost(1) <= budget. Exponential steps from ``guess`` find a bracket, binary search closes it."""
    guess = max(1, min(guess, MAX_BATCH))
    if cost(guess) <= budget:
        lo, step = guess, 1
        hi = lo + step
        while hi <= MAX_BATCH and cost(hi) <= budget:
            lo, step = hi, step * 2
            hi = lo + step
        if hi > MAX_BATCH:
            return MAX_BATCH, MAX_BATCH + 1
    else:
        hi, step = guess, 1
        lo = max(1, hi - step)
        while lo > 1 and cost(lo) > budget:
            hi, step = lo, step * 2
            lo = max(1, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _linear_guess(cost: Callable[[int], int], budget: int) -> int:
    one = cost(1)
    per = cost(2) - one
    if per <= 0:
        return 2
    return max(1, 1 + (budget - one) // per)


def _rel(estimate: int, measured: int) -> float | None:
    return round((estimate - measured) / measured, 4) if measured else None


# --- module tree and offload blocks ----------------------------------------------------------------------

def _top_modules(model: Model, part: str) -> list[tuple[str, nn.Module]]:
    """The part's first level: the children of its root module when one module holds the part (``visual.``
    or the whole model), else the modules its prefixes name."""
    root = model.module
    prefixes = model.part_prefixes(part)
    named = dict(root.named_modules())
    module_prefixes = [p.rstrip(".") for p in prefixes if p.rstrip(".") in named]
    if prefixes == [""]:
        return list(root.named_children())
    if len(module_prefixes) == 1 and len(prefixes) == 1:
        base = module_prefixes[0]
        return [(f"{base}.{n}", m) for n, m in named[base].named_children()]
    return [(p, named[p]) for p in module_prefixes]


def tree_modules(model: Model, part: str) -> list[tuple[str, nn.Module]]:
    """Modules of the tree: the first level and their children."""
    import torch.nn as nn

    out = []
    for name, mod in _top_modules(model, part):
        out.append((name, mod))
        for n, child in mod.named_children():
            out.append((f"{name}.{n}", child))
            if isinstance(child, nn.ModuleList):   # never called itself: its items are
                out += [(f"{name}.{n}.{i}", item) for i, item in child.named_children()]
    return out


def module_tree(model: Model, part: str, trace: tracing.Trace) -> list[dict]:
    """Two levels of modules, each with params, weight bytes and its own activation peak (bytes alive above
    those at its entry while it ran) and that peak's share of the part's; sorted by weights + activations."""
    import torch.nn as nn

    peak = trace.peak_bytes or 1

    def node(name: str, mod: nn.Module, children: bool) -> dict:
        act = trace.module_peaks.get(name, 0)
        if type(mod) is nn.ModuleList:   # the peak of its largest item
            act = max((trace.module_peaks.get(f"{name}.{i}", 0) for i, _ in mod.named_children()), default=0)
        row = {"module": name, "params": sum(counting.logical_numel(p) for p in mod.parameters()),
               "weights_bytes": counting.module_weight_bytes(mod), "activation_bytes": act,
               "activation_share": round(act / peak, 4)}
        if children:
            kids = [node(f"{name}.{n}", m, False) for n, m in mod.named_children()]
            row["children"] = sorted(kids, key=_order)
        return row

    rows = [node(name, mod, True) for name, mod in _top_modules(model, part)]
    covered = {id(t) for _, mod in _top_modules(model, part) for t in counting.unique_tensors(mod)}
    loose = [(n, t) for n, t in model.named_tensors(part) if id(t) not in covered]
    if loose:
        rows.append({"module": "(tensors: " + ", ".join(n.rsplit(".", 1)[-1] for n, _ in loose[:4])
                     + (", ..." if len(loose) > 4 else "") + ")", "tensors": [n for n, _ in loose],
                     "params": sum(counting.logical_numel(t) for _, t in loose if t.is_floating_point()),
                     "weights_bytes": counting.unique_bytes(t for _, t in loose), "activation_bytes": 0,
                     "activation_share": 0.0, "children": []})
    return sorted(rows, key=_order)


def _order(row: dict) -> tuple:
    return (-(row["weights_bytes"] + row["activation_bytes"]), row["module"])


def offload_blocks(module: nn.Module, prefix: str = "") -> list[str]:
    """The blocks weights move in when offloaded, names prefixed by ``prefix``: each item of a list of blocks
    (transformer layers, ResNet stages' blocks, MobileNet's feature blocks) and each other submodule with
    weights; modules holding such lists are opened. Weights of an opened module itself (a class token, a
    projection matrix) stay resident. ``mmopt.runtime.load_offloaded`` gives accelerate these same blocks."""
    blocks = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is None:
            continue
        full = prefix + name
        if holds_blocks(child):
            blocks += [f"{full}.{i}" for i, item in child.named_children()
                       if next(item.parameters(), None) is not None]
        elif any(holds_blocks(m) for m in child.modules()):
            blocks += offload_blocks(child, full + ".")
        else:
            blocks.append(full)
    return blocks


def part_blocks(model: Model, part: str) -> list[str]:
    """Offload blocks (``offload_blocks``) of the part's modules, names relative to the root."""
    import torch.nn as nn

    holder = nn.Module()
    blocks = []
    for name, mod in _top_modules(model, part):
        holder.add_module("m", mod)
        blocks += [name + b[1:] for b in offload_blocks(holder, "")]
    return blocks


def offload_summary(est: Estimator, inf: dict) -> dict:
    trace = inf["trace"]
    gpu_peak = trace.offload_peak_bytes + inf["input_bytes"]
    return {"device": "cpu", "gpu_peak_bytes": gpu_peak, "without_offload_bytes": inf["peak_total_bytes"],
            "largest_block": trace.offload_block, "largest_block_bytes": trace.offload_block_bytes,
            "resident_bytes": trace.resident_bytes, "blocks": len(part_blocks(est.model, est.part)),
            "model": "weights stay in CPU memory; each block's weights move to the GPU just before it runs and "
                     "leave after (accelerate AlignDevicesHook per block, mmopt.runtime.load_offloaded); the GPU holds "
                     "the activations, the inputs, the running block's weights and the few weights outside "
                     "any block. Transfer time is not modelled."}
