"""Distillation of one part of a student toward its teacher: recovery after pruning, training after substitution.

Family-agnostic: inputs come from ``batches_fn()`` (e.g. ``mmopt.calibration.inputs_for``), outputs from
``adapter.run`` (or, with ``tokens``, every token's hidden state from ``adapter.run_hidden``). Deterministic for
a seed: the inputs come in a fixed order, dropout stays off (the modules stay in eval mode; only gradients are
switched on), and the seed fixes every random draw.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.core import Model
    from mmopt.progress import Progress

EVAL_BATCHES = 8            # batches the before/after check runs on
STALL_TOLERANCE = 1e-3      # relative improvement of the smoothed loss that still counts as progress
EMA = 0.9                   # smoothing of the per-step loss for the stall test


def describe_run(stats: dict, last_key: str = "final_loss") -> str:
    """A distillation run in a few words, for a pass's brief: steps, the loss's ends, and whether it was reverted."""
    return (f"{stats['steps']} steps, loss {stats['first_loss']:.4f} -> {stats[last_key]:.4f}"
            + (" (reverted: it made things worse)" if stats["reverted"] else ""))


def use_tokens(match: str, adapter: Adapter, model: Model, part: str) -> bool:
    """The ``match`` option (auto / output / tokens) as a decision: auto matches tokens where the adapter can run
    every token's hidden state (Hugging Face text encoders)."""
    return match == "tokens" or (match == "auto" and adapter.can_run_hidden(model, part))


def loss_fn(kind: str, tokens: bool = False) -> Callable[[Any, Any], Any]:
    """Pooled outputs: plain cosine / MSE. Tokens: (hidden, mask) pairs, padding masked out."""
    import torch.nn.functional as F

    if kind not in ("cosine", "mse"):
        raise ValueError(f"unknown distillation loss {kind!r}")
    if not tokens:
        if kind == "cosine":
            return lambda out, ref: (1 - F.cosine_similarity(out.float(), ref.float(), dim=-1)).mean()
        return lambda out, ref: F.mse_loss(out.float(), ref.float())

    def token_loss(out: tuple, ref: tuple) -> Any:
        mask = ref[1].to(out[0].dtype)
        if kind == "cosine":
            cos = F.cosine_similarity(out[0].float(), ref[0].float(), dim=-1)
            return 1.0 - (cos * mask).sum() / mask.sum()
        err = (out[0].float() - ref[0].float()).pow(2) * mask.unsqueeze(-1)
        return err.sum() / (mask.sum() * out[0].shape[-1])

    return token_loss


def runner(adapter: Adapter, part: str, tokens: bool) -> Callable[[Model, tuple], Any]:
    """What is matched: the part's output, or (hidden states, attention mask) of every token (``run_hidden``
    raises UnsupportedError where the family has none)."""
    if not tokens:
        return lambda model, inputs: adapter.run(model, part, inputs)

    def hidden(model: Model, inputs: tuple) -> tuple:
        states, mask = adapter.run_hidden(model, part, inputs)
        return states.float(), mask

    return hidden


def _detach(value: Any) -> Any:
    return tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()


def _split(inputs: tuple, size: int) -> Iterator[tuple]:
    """Cut one input tuple into tuples of at most ``size`` rows."""
    n = inputs[0].shape[0]
    for i in range(0, n, size):
        yield tuple(t[i:i + size] for t in inputs)


def _batches(batches_fn: Callable[[], Iterable[tuple]], size: int, device: str) -> Iterator[tuple[int, tuple]]:
    """(index, inputs) forever, cycling through ``batches_fn()``; index repeats each epoch."""
    while True:
        index = 0
        for inputs in batches_fn():
            for piece in _split(tuple(inputs), size):
                yield index, tuple(t.to(device) for t in piece)
                index += 1
        if index == 0:
            raise ValueError("distillation got no input batches")


def distill(student_model: Model, teacher_model: Model, adapter: Adapter, part: str,
            batches_fn: Callable[[], Iterable[tuple]], steps: int, lr: float, batch_size: int, loss: str = "cosine",
            seed: int = 0, progress: Progress | None = None, device: str = "cpu", patience: int | None = None,
            tokens: bool = False) -> dict:
    """Train ``part`` of ``student_model`` for up to ``steps`` AdamW steps so its outputs match the teacher's.

    Embedding tables stay frozen: they are most of a small encoder's weights, calibration text touches few of
    their rows, and rows moved for those tokens drift away from the rest of the vocabulary. With ``tokens``
    every token's hidden state is matched: many targets per sample, so a few hundred calibration texts teach
    the student without it memorising them.

    ``batches_fn()`` yields input tuples for ``part``; the teacher's outputs for each batch are computed once
    and reused in later epochs. Stops early when the smoothed loss has not improved by a relative
    ``STALL_TOLERANCE`` for ``patience`` steps. The loss on the first ``EVAL_BATCHES`` batches is measured
    before and after; should training have made it worse (a too-high learning rate), the part's weights are put
    back as they were and ``reverted`` says so. Returns steps run, losses, and the time taken.
    """
    import torch

    from mmopt.progress import NO_PROGRESS

    progress = progress or NO_PROGRESS
    torch.manual_seed(seed)
    frozen = {id(m.weight) for m in student_model.module.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for _, p in student_model.named_tensors(part, buffers=False)
              if p.is_floating_point() and id(p) not in frozen]
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
    criterion = loss_fn(loss, tokens)
    run = runner(adapter, part, tokens)
    targets: dict[int, Any] = {}
    snapshot = [p.detach().clone() for p in params]
    eval_before = _eval_loss(student_model, teacher_model, run, batches_fn, batch_size, device, criterion, targets)
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
                        targets[index] = _detach(run(teacher_model, inputs))
                out = run(student_model, inputs)
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
    eval_after = _eval_loss(student_model, teacher_model, run, batches_fn, batch_size, device, criterion, targets)
    reverted = eval_after > eval_before
    if reverted:
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
    return {"steps": done, "first_loss": first, "final_loss": last, "stopped_early": stopped_early,
            "eval_loss_before": eval_before, "eval_loss_after": eval_after, "reverted": reverted,
            "seconds": round(time.perf_counter() - started, 2), "loss": loss, "match": "tokens" if tokens else "output"}


def _eval_loss(student_model: Model, teacher_model: Model, run: Callable, batches_fn: Callable, size: int,
               device: str, criterion: Callable, targets: dict) -> float:
    """Mean loss over the first ``EVAL_BATCHES`` batches, without training."""
    import torch

    losses = []
    with torch.no_grad():
        for index, inputs in _batches(batches_fn, size, device):
            if index >= EVAL_BATCHES or (losses and index == 0):
                break
            if index not in targets:
                targets[index] = _detach(run(teacher_model, inputs))
            losses.append(float(criterion(run(student_model, inputs), targets[index])))
    return sum(losses) / len(losses)
