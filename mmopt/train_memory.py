"""The memory of one training step of a part: weights, gradients, optimizer state, activations, inputs.

The step is what a fine-tuning loop does: forward the part (under autocast with ``amp``), take a scalar loss
from its output embedding (the mean, so no extra weights), backward, ``optimizer.step()``, ``zero_grad()``.
Two steps run, so the optimizer's state (created lazily in the first) is in memory during the second. The
bytes come from ``memory.trace_train`` (fake tensors, torch's MemTracker) or, with ``measure`` on CUDA,
``memory.cuda_train_peak``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmopt import memory
from mmopt.adapters.base import Shapes
from mmopt.errors import UserError

OPTIMIZERS = ("adamw", "sgd")
AMP = {"bf16": "bfloat16", "fp16": "float16"}


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


def make_optimizer(name: str):
    """A factory params -> optimizer. ``foreach=True`` is what PyTorch picks on CUDA; it is forced here so the
    CPU estimate allocates the same temporaries (one params-sized buffer in AdamW's step)."""
    import torch

    def build(params: list) -> Any:
        if name == "sgd":
            return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    return build


def optimizer_state_bytes(module: Any, name: str) -> int:
    """Bytes the optimizer's state holds after a step: AdamW two moments (and a step count per parameter, a
    0-d float32 tensor), SGD with momentum one buffer."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    per_param = sum(memory.tensor_bytes(p) for p in params)
    if name == "sgd":
        return per_param
    return 2 * per_param + len(params) * torch.float32.itemsize


def training_step(adapter: Any, part: str, amp: str | None):
    """The function one step runs on a model: forward (under autocast) + mean loss + backward."""
    import torch

    def step(model: Any, *inputs: Any) -> None:
        device = "cuda" if any(getattr(t, "is_cuda", False) for t in inputs) else "cpu"
        if amp:
            with torch.autocast(device, dtype=getattr(torch, AMP[amp])):
                out = adapter.run(model, part, inputs)
        else:
            out = adapter.run(model, part, inputs)
        out.float().mean().backward()

    return step


def _train_only(model: Any, adapter: Any, part: str, grad_ckpt: bool) -> str | None:
    """Set ``model`` up to train ``part`` alone (the other parts frozen) in train mode, with the family's
    gradient checkpointing when asked; return how checkpointing was turned on."""
    how = adapter.enable_grad_checkpointing(model, part) if grad_ckpt else None
    owned = {id(t) for _, t in model.named_tensors(part, buffers=False)}
    for p in model.module.parameters():
        p.requires_grad_(id(p) in owned and p.is_floating_point())
    model.module.train()
    return how


def estimate(model: Any, adapter: Any, part: str, shapes: Shapes, opts: TrainOptions, measure: bool = False) -> dict:
    """Peak bytes of a training step of ``part`` at ``shapes`` (weights included), with a breakdown.

    The other parts' weights are frozen (no gradients, no optimizer state) and not counted. The estimate runs on
    a fake copy; a CUDA measurement trains a real copy, so ``model`` is never changed."""
    check_options(opts)
    step = training_step(adapter, part, opts.amp)
    how: dict = {}

    def prepare(copied: Any) -> None:
        how["grad_ckpt"] = _train_only(copied, adapter, part, opts.grad_ckpt)

    if measure:
        inputs = adapter.example_inputs(model, part, shapes)
        trained = memory.measuring_copy(model)
        prepare(trained)
        peak = memory.cuda_train_peak(lambda *a: step(trained, *a), trained.module, inputs,
                                      make_optimizer(opts.optimizer))
        # the copy's weights, not the original's, are the ones the step held
        peak.peak_total_bytes -= memory.module_weight_bytes(model.module)
        del trained
    else:  # one real row, grown to the batch on fake tensors
        inputs = adapter.example_inputs(model, part, dataclasses.replace(shapes, batch_size=1))
        peak = memory.trace_train(step, model, inputs, make_optimizer(opts.optimizer), batch=shapes.batch_size,
                                  prepare=prepare)
    input_bytes = shapes.batch_size * sum(memory.tensor_bytes(t) for t in inputs if hasattr(t, "numel")) \
        // max(1, inputs[0].shape[0])
    # Only this part is assumed loaded (mmopt.load(parts=[part])): the other parts' weights, resident all
    # through the step, come off.
    others = memory.module_weight_bytes(model.module) - memory.part_weight_bytes(model, part)
    total = peak.peak_total_bytes - others
    if peak.breakdown:
        peak.breakdown["weights"] -= others
    return {"peak_total_bytes": total, "breakdown": peak.breakdown, "method": peak.method,
            "how": peak.how, "optimizer": opts.optimizer, "amp": opts.amp, "grad_ckpt": how.get("grad_ckpt"),
            "input_bytes": input_bytes}
