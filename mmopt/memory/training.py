"""The memory of one training step of a part: weights, gradients, optimizer state, activations, inputs.

The step is what a fine-tuning loop does: forward the part (under autocast with ``amp``), take a scalar loss
from its output embedding (the mean, so no extra weights), backward, ``optimizer.step()``, ``zero_grad()``.
Two steps run, so the optimizer's state (created lazily in the first) is in memory during the second. The
bytes come from ``trace_train`` (fake tensors, torch's MemTracker) or, with ``measure`` on CUDA,
``cuda_train_peak``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from mmopt.core import Model, Shapes
from mmopt.errors import UserError
from mmopt.memory.counting import input_bytes, module_weight_bytes, part_weight_bytes, tensor_bytes
from mmopt.memory.tracing import AMP, ESTIMATED, MEASURED_CUDA, fake_inputs, measuring_copy, part_forward, root_of

if TYPE_CHECKING:
    from torch import nn

    from mmopt.adapters.base import Adapter

OPTIMIZERS = ("adamw", "sgd")
Optimizer = Callable[[list], Any]     # params -> a torch optimizer


@dataclass(frozen=True)
class TrainOptions:
    optimizer: str = "adamw"
    amp: str | None = None          # bf16 | fp16 | None
    grad_ckpt: bool = False


def check_options(opts: TrainOptions) -> None:
    if opts.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer: expected {' or '.join(OPTIMIZERS)}, got {opts.optimizer!r}")
    if opts.amp is not None and opts.amp not in AMP:
        raise UserError(f"--amp: expected bf16 or fp16, got {opts.amp!r}")


def make_optimizer(name: str) -> Optimizer:
    """A factory params -> optimizer. ``foreach=True`` is what PyTorch picks on CUDA; it is forced here so the
    CPU estimate allocates the same temporaries (one params-sized buffer in AdamW's step)."""
    import torch

    def build(params: list) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    return build


def optimizer_state_bytes(module: nn.Module, name: str) -> int:
    """Bytes the optimizer's state holds after a step: AdamW two moments (and a step count per parameter, a
    0-d float32 tensor), SGD with momentum one buffer."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    per_param = sum(tensor_bytes(p) for p in params)
    if name == "sgd":
        return per_param
    return 2 * per_param + len(params) * torch.float32.itemsize


def training_step(adapter: Adapter, part: str, amp: str | None) -> Callable[..., None]:
    """The function one step runs on a model: forward (``tracing.part_forward``, under autocast) + mean loss +
    backward."""
    forward = part_forward(adapter, part, amp)

    def step(model: Model, *inputs: Any) -> None:
        forward(model, *inputs).float().mean().backward()

    return step


def _train_only(model: Model, adapter: Adapter, part: str, grad_ckpt: bool) -> str | None:
    """Set ``model`` up to train ``part`` alone (the other parts frozen) in train mode, with the family's
    gradient checkpointing when asked; return how checkpointing was turned on."""
    how = adapter.enable_grad_checkpointing(model, part) if grad_ckpt else None
    owned = {id(t) for _, t in model.named_tensors(part, buffers=False)}
    for p in model.module.parameters():
        p.requires_grad_(id(p) in owned and p.is_floating_point())
    model.module.train()
    return how


def estimate(model: Model, adapter: Adapter, part: str, shapes: Shapes, opts: TrainOptions,
             measure: bool = False) -> dict:
    """Peak bytes of a training step of ``part`` at ``shapes`` (weights included), with a breakdown.

    The other parts' weights are frozen (no gradients, no optimizer state) and not counted. The estimate runs on
    a fake copy; a CUDA measurement trains a real copy, so ``model`` is never changed."""
    check_options(opts)
    step = training_step(adapter, part, opts.amp)
    how: dict = {}

    def prepare(copied: Model) -> None:
        how["grad_ckpt"] = _train_only(copied, adapter, part, opts.grad_ckpt)

    if measure:
        inputs = adapter.example_inputs(model, part, shapes)
        trained = measuring_copy(model)
        prepare(trained)
        peak = cuda_train_peak(lambda *a: step(trained, *a), trained.module, inputs, make_optimizer(opts.optimizer))
        # the copy's weights, not the original's, are the ones the step held
        peak.peak_total_bytes -= module_weight_bytes(model.module)
        del trained
    else:  # one real row, grown to the batch on fake tensors
        inputs = adapter.example_inputs(model, part, dataclasses.replace(shapes, batch_size=1))
        peak = trace_train(step, model, inputs, make_optimizer(opts.optimizer), batch=shapes.batch_size,
                           prepare=prepare)
    # Only this part is assumed loaded (mmopt.load(parts=[part])): the other parts' weights, resident all
    # through the step, come off.
    others = module_weight_bytes(model.module) - part_weight_bytes(model, part)
    total = peak.peak_total_bytes - others
    if peak.breakdown:
        peak.breakdown["weights"] -= others
        _optimizer_temporaries_apart(peak.breakdown, model, part, opts.optimizer)
    return {"peak_total_bytes": total, "breakdown": peak.breakdown, "method": peak.method,
            "how": peak.how, "optimizer": opts.optimizer, "amp": opts.amp, "grad_ckpt": how.get("grad_ckpt"),
            "input_bytes": input_bytes(inputs, shapes.batch_size)}


def _optimizer_temporaries_apart(breakdown: dict, model: Model, part: str, optimizer: str) -> None:
    """MemTracker files every tensor made inside ``optimizer.step()`` as optimizer state, so foreach AdamW's
    intermediates (another copy of the weights at the step's peak) read as a third moment. The state itself is
    known exactly (two moments + a step count per parameter; SGD one buffer): the rest is temporaries."""
    params = [p for name, p in model.module.named_parameters() if model.part_of(name) == part]
    per_param = sum(tensor_bytes(p) for p in params)
    exact = per_param if optimizer == "sgd" else 2 * per_param + 4 * len(params)
    excess = breakdown.get("optimizer_states", 0) - exact
    if excess > 0:
        breakdown["optimizer_states"] = exact
        breakdown["temporaries"] = breakdown.get("temporaries", 0) + excess


# --- the traces ----------------------------------------------------------------------------------------------------

@dataclass
class TrainPeak:
    """The high-water mark of one training step (the second of two, so optimizer state exists) by kind."""

    peak_total_bytes: int
    breakdown: dict      # weights, gradients, optimizer_states, activations, temporaries, inputs (at the peak)
    method: str
    how: str


_KINDS = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer_states",
          "Activation": "activations", "Temp": "temporaries", "Other": "inputs"}


def _breakdown(snapshot: dict) -> dict:
    out = {kind: 0 for kind in dict.fromkeys(_KINDS.values())}
    for device_snap in snapshot.values():
        for key, value in device_snap.items():
            name = getattr(key, "value", key)
            if name in _KINDS:
                out[_KINDS[name]] += int(value)
    return out


def _peak_tracker(base: type) -> type:
    """MemTracker keeping only the global peak: its per-module peak snapshots (a deep copy for every module
    on the stack, at every op) triple the cost and profile does not use them."""

    class PeakOnly(base):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)   # a flat dict of ints: a shallow copy is enough

    return PeakOnly


def trace_train(step: Callable[..., Any], subject: nn.Module | Model, inputs: tuple, make: Optimizer,
                steps: int = 2, batch: int | None = None, prepare: Callable[[Any], None] | None = None) -> TrainPeak:
    """Estimate the peak of training steps ``step(copy, *inputs)`` (forward + backward, returns nothing)
    followed by ``optimizer.step()`` and ``zero_grad()``, on a fake copy of ``subject`` (``prepare(copy)`` first
    sets it up: which parameters train, checkpointing), with torch's MemTracker (which tells weights,
    gradients, optimizer state, activations and temporaries apart). Bytes are as the tensors hold them;
    ``cuda_rounded`` rounding is not applied (under a percent for these models; see docs/estimator.md)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    clone = measuring_copy(subject, mode, requires_grad=True)
    with mode:
        if prepare is not None:
            prepare(clone)
        root = root_of(clone)
        faked = fake_inputs(mode, inputs, batch)
        optimizer = make([p for p in root.parameters() if p.requires_grad])
        tracker = _peak_tracker(MemTracker)()
        tracker.track_external(root, optimizer, *[t for t in faked if isinstance(t, torch.Tensor)])
        with tracker:
            for _ in range(steps):
                step(clone, *faked)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")
    breakdown = _breakdown(snapshot)
    return TrainPeak(sum(breakdown.values()), breakdown, ESTIMATED, "fake-tensor MemTracker")


def cuda_train_peak(step: Callable[..., Any], module: nn.Module, inputs: tuple, make: Optimizer,
                    steps: int = 2) -> TrainPeak:
    """Measured on CUDA: max allocated over ``steps`` training steps, weights and inputs included."""
    import torch

    optimizer = make([p for p in module.parameters() if p.requires_grad])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(*inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del optimizer
    return TrainPeak(peak, {}, MEASURED_CUDA, "torch.cuda.max_memory_allocated")
