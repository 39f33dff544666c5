"""Output distillation: train one part of a student model to reproduce the teacher part's embeddings.

Deterministic for a seed: the inputs come in a fixed order, dropout stays off (the modules stay in eval
mode; only gradients are switched on), and the seed fixes every random draw.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

EVAL_BATCHES = 8            # batches the before/after check runs on
STALL_TOLERANCE = 1e-3      # relative improvement of the smoothed loss that still counts as progress
EMA = 0.9                   # smoothing of the per-step loss for the stall test


def loss_fn(kind: str) -> Callable[[Any, Any], Any]:
    import torch.nn.functional as F

    if kind == "cosine":
        return lambda out, ref: (1 - F.cosine_similarity(out.float(), ref.float(), dim=-1)).mean()
    if kind == "mse":
        return lambda out, ref: F.mse_loss(out.float(), ref.float())
    raise ValueError(f"unknown distillation loss {kind!r}")


def _split(inputs: tuple, size: int) -> Iterator[tuple]:
    """Cut one input tuple into tuples of at most ``size`` rows."""
    n = inputs[0].shape[0]
    for i in range(0, n, size):
        yield tuple(t[i:i + size] for t in inputs)


def _batches(batches_fn: Callable[[], Iterable[tuple]], size: int, device: Any) -> Iterator[tuple[int, tuple]]:
    """(index, inputs) forever, cycling through ``batches_fn()``; index repeats each epoch."""
    while True:
        index = 0
        for inputs in batches_fn():
            for piece in _split(tuple(inputs), size):
                yield index, tuple(t.to(device) for t in piece)
                index += 1
        if index == 0:
            raise ValueError("distillation got no input batches")


def distill(student_model: Any, teacher_model: Any, adapter: Any, part: str, batches_fn: Callable[[], Iterable[tuple]],
            steps: int, lr: float, batch_size: int, loss: str, seed: int, progress: Any, device: Any,
            patience: int | None = None) -> dict:
    """Train ``part`` of ``student_model`` for up to ``steps`` AdamW steps so ``adapter.run`` matches the teacher.

    ``batches_fn()`` yields input tuples for ``part``; the teacher's outputs for each batch are computed once
    and reused in later epochs. Stops early when the smoothed loss has not improved by a relative
    ``STALL_TOLERANCE`` for ``patience`` steps. The loss on the first ``EVAL_BATCHES`` batches is measured
    before and after; should training have made it worse (a too-high learning rate), the part's weights are put
    back as they were and ``reverted`` says so. Returns steps run, losses, and the time taken.
    """
    import torch

    torch.manual_seed(seed)
    params = [p for _, p in student_model.named_tensors(part, buffers=False) if p.is_floating_point()]
    if not params:
        raise ValueError(f"part {part!r} has no trainable parameters")
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # Linear warm-up over the first 5% of steps, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    criterion = loss_fn(loss)
    targets: dict[int, Any] = {}
    snapshot = [p.detach().clone() for p in params]
    eval_before = _eval_loss(student_model, teacher_model, adapter, part, batches_fn, batch_size, device, criterion,
                             targets)
    started = time.perf_counter()
    first = last = None
    best, since_best, smooth, done, stopped_early = float("inf"), 0, None, 0, False
    try:
        with torch.enable_grad(), progress.task(f"distilling {part}", total=steps) as task:
            for index, inputs in _batches(batches_fn, batch_size, device):
                if done >= steps:
                    break
                if index not in targets:
                    with torch.no_grad():
                        targets[index] = adapter.run(teacher_model, part, inputs).detach()
                out = adapter.run(student_model, part, inputs)
                value = criterion(out, targets[index])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                done += 1
                last = float(value.detach())
                first = last if first is None else first
                smooth = last if smooth is None else EMA * smooth + (1 - EMA) * last
                task.advance(loss=round(last, 5))
                if smooth < best * (1 - STALL_TOLERANCE):
                    best, since_best = smooth, 0
                else:
                    since_best += 1
                if patience is not None and since_best >= patience:
                    stopped_early = True
                    break
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
            p.grad = None
    eval_after = _eval_loss(student_model, teacher_model, adapter, part, batches_fn, batch_size, device, criterion,
                            targets)
    reverted = eval_after > eval_before
    if reverted:
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
    return {"steps": done, "first_loss": first, "final_loss": last, "stopped_early": stopped_early,
            "eval_loss_before": eval_before, "eval_loss_after": eval_after, "reverted": reverted,
            "seconds": round(time.perf_counter() - started, 2), "loss": loss}


def _eval_loss(student_model: Any, teacher_model: Any, adapter: Any, part: str, batches_fn: Callable, size: int,
               device: Any, criterion: Callable, targets: dict) -> float:
    """Mean loss over the first ``EVAL_BATCHES`` batches, without training."""
    import torch

    losses = []
    with torch.no_grad():
        for index, inputs in _batches(batches_fn, size, device):
            if index >= EVAL_BATCHES or (losses and index == 0):
                break
            if index not in targets:
                targets[index] = adapter.run(teacher_model, part, inputs).detach()
            losses.append(float(criterion(adapter.run(student_model, part, inputs), targets[index])))
    return sum(losses) / len(losses)
