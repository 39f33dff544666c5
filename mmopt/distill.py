"""Short distillation of one part of a student model against its teacher: recovery after pruning or substitution.

The loop is family-agnostic: inputs come from ``batches_fn(batch_size)`` (e.g. ``mmopt.calibration.inputs_for``),
outputs from ``adapter.run``; only the student's parameters of ``part`` are trained.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

from mmopt.errors import DataError
from mmopt.progress import NO_PROGRESS, Progress

Loss = Literal["cosine", "mse"]


def distill(student_model: Any, teacher_model: Any, adapter: Any, part: str,
            batches_fn: Callable[[int], Iterable[tuple]], steps: int, lr: float, batch_size: int,
            loss: Loss = "cosine", seed: int = 0, progress: Progress = NO_PROGRESS, device: str = "cpu",
            tokens: bool = False) -> dict:
    """Train ``part`` of ``student_model`` (embedding tables excluded) for ``steps`` AdamW steps to match
    ``teacher_model``'s output of ``part``.

    Batches are drawn (seeded by ``seed``) from ``batches_fn(batch_size)``, reshuffled each pass over them; the
    teacher's outputs are computed once. With ``tokens`` the loss is on every token's last hidden state
    (``adapter.run_hidden``) instead of the pooled output: many targets per sample, so a few hundred calibration
    texts teach the student without it memorising them. Returns ``{"loss": [per-step loss], "steps", "first_loss", "last_loss"}``.
    """
    import torch

    batches = [tuple(t.to(device) if hasattr(t, "to") else t for t in inputs) for inputs in batches_fn(batch_size)]
    if not batches:
        raise DataError(f"distillation of {part!r}: no calibration batches")
    run = _token_runner(adapter, part) if tokens else (lambda m, inputs: adapter.run(m, part, inputs).float())
    with torch.no_grad():
        targets = [run(teacher_model, inputs) for inputs in batches]
    # Embedding tables stay frozen: they are most of a small encoder's weights, calibration text touches few of
    # their rows, and rows moved for those tokens drift away from the rest of the vocabulary.
    frozen = {id(m.weight) for m in student_model.module.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for name, p in student_model.module.named_parameters() if student_model.owns(part, name)
              and p.is_floating_point() and id(p) not in frozen]
    flags = {id(p): p.requires_grad for p in student_model.module.parameters()}
    for p in student_model.module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = {("cosine", False): _cosine_loss, ("mse", False): _mse_loss,
               ("cosine", True): _token_cosine_loss, ("mse", True): _token_mse_loss}[(loss, tokens)]
    history: list[float] = []
    order: list[int] = []
    # eval(): dropout off, so the loss follows the weights alone and runs repeat exactly.
    student_model.module.eval()
    try:
        with torch.enable_grad(), progress.task(f"recovering {part}", total=steps) as task:
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(batches), generator=generator).tolist()
                i = order.pop()
                value = loss_fn(run(student_model, batches[i]), targets[i])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                history.append(round(float(value.detach()), 6))
                task.advance(loss=history[-1])
    finally:
        for p in student_model.module.parameters():
            p.requires_grad_(flags.get(id(p), True))
            p.grad = None
    return {"loss": history, "steps": steps, "first_loss": history[0] if history else None,
            "last_loss": history[-1] if history else None}


def _token_runner(adapter: Any, part: str) -> Callable:
    if not hasattr(adapter, "run_hidden"):
        raise DataError(f"token-level distillation is not supported for {adapter.source} models")

    def run(model: Any, inputs: tuple) -> tuple:
        hidden, mask = adapter.run_hidden(model, part, inputs)
        return hidden.float(), mask

    return run


def _token_cosine_loss(out: tuple, target: tuple) -> Any:
    import torch

    mask = target[1].to(out[0].dtype)
    cos = torch.nn.functional.cosine_similarity(out[0], target[0], dim=-1)
    return 1.0 - (cos * mask).sum() / mask.sum()


def _token_mse_loss(out: tuple, target: tuple) -> Any:
    mask = target[1].to(out[0].dtype).unsqueeze(-1)
    return ((out[0] - target[0]).pow(2) * mask).sum() / (mask.sum() * out[0].shape[-1])


def _cosine_loss(out: Any, target: Any) -> Any:
    import torch

    return 1.0 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()


def _mse_loss(out: Any, target: Any) -> Any:
    import torch

    return torch.nn.functional.mse_loss(out, target)
