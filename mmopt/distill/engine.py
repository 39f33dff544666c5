"""The distillation loop: AdamW toward the teacher's outputs, rate from a range test, warm-up-cosine decay, the
held-out split scored every ``eval_every`` steps, the best weights kept, early stop on ``patience``.

Family-agnostic: samples come from ``mmopt.distill.data`` (texts tokenized per batch, or tensors), outputs from
``adapter.run`` (and, with ``tokens``, every token's hidden state from ``adapter.run_hidden``). Deterministic
for a seed: batches and augmentations are drawn from seeded generators and dropout stays off (the modules stay
in eval mode; only gradients are switched on).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.core import Model
    from mmopt.distill.data import TensorData, TextData
    from mmopt.distill.options import Training
    from mmopt.progress import Progress


def describe_run(stats: dict) -> str:
    """A distillation run in a few words, for a pass's brief."""
    words = f"{stats['steps']} steps at lr {stats['lr']:.1e}" + (" (range test)" if stats["lr_source"] ==
                                                                  "range test" else "")
    if stats.get("held_out_before") is not None:
        words += f", held-out cos {stats['held_out_before']:.3f} -> {stats['held_out_best']:.3f}"
        if stats["reverted"]:
            words += " (kept the weights from before: training made them worse)"
        elif stats["best_step"] != stats["steps"]:
            words += f" (best at step {stats['best_step']})"
    in_bfloat16 = [who for who, key in (("teacher labels", "teacher_labels"), ("student", "train_precision"))
                   if stats.get(key) == "bfloat16"]
    if in_bfloat16:
        words += f", {' and '.join(in_bfloat16)} in bfloat16"
    return words


def use_tokens(match: str, adapter: Adapter, model: Model, part: str) -> bool:
    """The ``match`` option (auto / output / tokens) as a decision: auto matches tokens where the adapter can run
    every token's hidden state (Hugging Face text encoders)."""
    return match == "tokens" or (match == "auto" and adapter.can_run_hidden(model, part))


def loss_fn(kind: str, tokens: bool = False) -> Callable[[Any, Any], Any]:
    """Pooled outputs: 1 - cosine or MSE. Tokens: (hidden, mask) pairs, padding masked out; the loss of every
    token's state plus that of their mean (the sentence embedding mean-pooling encoders output)."""
    import torch.nn.functional as F

    if kind not in ("cosine", "mse"):
        raise ValueError(f"unknown distillation loss {kind!r}")
    if not tokens:
        if kind == "cosine":
            return lambda out, ref: (1 - F.cosine_similarity(out.float(), ref.float(), dim=-1)).mean()
        return lambda out, ref: F.mse_loss(out.float(), ref.float())

    def token_loss(out: tuple, ref: tuple) -> Any:
        mask = ref[1].to(out[0].dtype)
        pooled = [(h.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                  for h in (out[0], ref[0])]
        if kind == "cosine":
            cos = F.cosine_similarity(out[0].float(), ref[0].float(), dim=-1)
            return 2.0 - (cos * mask).sum() / mask.sum() - F.cosine_similarity(*pooled, dim=-1).mean()
        err = (out[0].float() - ref[0].float()).pow(2) * mask.unsqueeze(-1)
        return err.sum() / (mask.sum() * out[0].shape[-1]) + F.mse_loss(*pooled)

    return token_loss


def runner(adapter: Adapter, part: str, tokens: bool) -> Callable[[Model, tuple], Any]:
    """What is matched: the part's output, or (hidden states, attention mask) of every token."""
    if not tokens:
        return lambda model, inputs: adapter.run(model, part, inputs)

    def hidden(model: Model, inputs: tuple) -> tuple:
        states, mask = adapter.run_hidden(model, part, inputs)
        return states.float(), mask

    return hidden


def _float(value: Any) -> Any:
    """Detached, floating tensors in float32 (a bfloat16 label's outputs; token masks stay as they are)."""
    if isinstance(value, tuple):
        return tuple(_float(v) for v in value)
    value = value.detach()
    return value.float() if value.is_floating_point() else value


def trainable(model: Model, part: str) -> list:
    """The part's floating-point parameters except embedding tables: they are most of a small encoder's weights,
    calibration text touches few of their rows, and rows moved for those tokens drift from the rest."""
    import torch

    frozen = {id(m.weight) for m in model.module.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for _, p in model.named_tensors(part, buffers=False) if p.is_floating_point() and id(p) not in frozen]
    if not params:
        raise ValueError(f"part {part!r} has no trainable parameters")
    return params


def distill(student_model: Model, teacher_model: Model, adapter: Adapter, part: str, data: TextData | TensorData,
            options: Training, seed: int = 0, progress: Progress | None = None, tokens: bool = False,
            split: Callable[[Any], tuple[Any, Any]] | None = None,
            refit: Any = None) -> dict:
    """Train ``part`` of ``student_model`` toward the teacher for up to ``options.steps`` steps; keep the weights
    that scored best on ``data``'s held-out split (those from before training, should none beat them).

    ``split`` turns one batch of ``data`` into (student inputs, teacher inputs); by default both take the batch.
    A student with its own tokenizer (``substitute: {student: ...}``) gets batches holding both tokenizations.
    ``refit``, when given (``refit.py: ProjectionRefit``), sees the teacher's outputs of every training step's batch
    (``observe``, after the student's forward on it; not the range test's) and, once the best weights are back,
    re-solves what it fits (``apply``), judged by the same held-out score; the report shows it under ``refit.name``.

    Returns what the report shows: the rate and where it came from, steps run, the held-out curve
    ([[step, mean cosine to the teacher], ...]), the best step, whether it stopped early, the augmentation.
    """
    import torch
    import torch.nn.functional as F

    from mmopt.distill import parallel
    from mmopt.distill.precision import computing_in, resolve
    from mmopt.distill.schedule import BestKeeper, lr_range_test, suggest_lr, warmup_cosine
    from mmopt.progress import NO_PROGRESS

    progress = progress or NO_PROGRESS
    data = parallel.shard(data)          # several processes: this one's share of every batch (parallel.py)
    torch.manual_seed(seed)
    params = trainable(student_model, part)
    criterion, run = loss_fn(options.loss, tokens), runner(adapter, part, tokens)
    split = split or (lambda batch: (batch, batch))
    with torch.no_grad():
        held = [(mine, adapter.run(teacher_model, part, theirs).float())
                for mine, theirs in map(split, data.held_batches())]

    def score() -> float:
        with torch.no_grad():
            cos = [F.cosine_similarity(adapter.run(student_model, part, inputs).float(), ref, dim=-1)
                   for inputs, ref in held]
        return parallel.mean(cos)

    labels: list = [None]
    device_type = params[0].device.type if params else "cpu"
    label_precision = resolve(options.teacher_labels, device_type)
    train_precision = resolve(options.train_precision, device_type)

    def step_loss() -> Any:
        mine, theirs = split(data.next_batch())
        with torch.no_grad(), computing_in(label_precision, device_type):
            target = labels[0] = _float(run(teacher_model, theirs))     # the teacher labels every (augmented) batch
        with computing_in(train_precision, device_type):
            out = run(student_model, mine)
        return parallel.global_loss(criterion(out, target), data)     # the loss itself in float32

    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    started = time.perf_counter()
    steps, losses, stopped = options.steps, [], False
    keeper = BestKeeper(params, score, options.patience)
    try:
        with torch.enable_grad(), parallel.shared_gradients(params):
            lr, source, range_test = options.lr, "given", None
            if lr is None:
                from mmopt.distill.schedule import RANGE_STEPS

                with progress.task(f"choosing a learning rate for {part}", total=RANGE_STEPS) as task:
                    test = lr_range_test(params, step_loss, on_step=task.advance)
                lr, source = suggest_lr(test), "range test"
                range_test = [[float(f"{a:.3g}"), round(b, 5)] for a, b in zip(test["lrs"], test["losses"])]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            keeper.check(0)
            with progress.task(f"distilling {part}", total=steps) as task:
                for step in range(steps):
                    for group in optimizer.param_groups:
                        group["lr"] = lr * warmup_cosine(step, steps)
                    value = step_loss()
                    if refit is not None:
                        refit.observe(labels[0])
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    losses.append(float(value.detach()))
                    done = step + 1
                    if done % options.eval_every == 0 or done == steps:
                        stopped = keeper.check(done) and done < steps
                    task.advance(loss=round(losses[-1], 5), held_out=round(keeper.last, 4))
                    if stopped:
                        break
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
            p.grad = None
    keeper.load_best()
    before = keeper.curve[0][1]
    info = {"steps": len(losses), "steps_planned": steps, "lr": float(f"{lr:.4g}"), "lr_source": source,
            "range_test": range_test, "first_loss": round(losses[0], 6) if losses else None,
            "final_loss": round(losses[-1], 6) if losses else None, "held_out_before": before,
            "held_out_best": round(keeper.best, 5), "best_step": keeper.best_step, "curve": keeper.curve,
            "stopped_early": stopped, "reverted": keeper.best_step == 0 and bool(losses),
            "held_out": {"samples": parallel.total(sum(int(ref.shape[0]) for _, ref in held)),
                         "split": "every 5th calibration sample the pass got" if data.really_held
                         else "the fit samples themselves (too few to hold any out)"},
            "augment": data.describe_augmentation(), "teacher_labels": label_precision,
            "train_precision": train_precision, "loss": options.loss,
            "match": "tokens" if tokens else "output",
            "seconds": round(time.perf_counter() - started, 2)}
    if refit is not None:
        info[refit.name] = refit.apply(score)
    parallel.check_agreement(params, info)   # several processes: all decided alike (parallel.py)
    return info
