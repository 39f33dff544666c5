"""Which FFN hidden units a pruned block keeps (``prune: {importance: reconstruction}``): the units whose loss the
rest can best make up for, once the block's output layer is re-solved by least squares (``refit.refit_ffn``).

The output layer ``fc2`` maps the hidden units ``x`` to ``W x + b``. With ``H = E[[x, 1] [x, 1]^T]`` over every
real token of the refit's texts, removing unit ``c`` and re-solving the others costs ``|w_c|^2 / [H^-1]_cc``
(Optimal Brain Surgeon on a layer's inputs, the structured form of Hassibi & Stork 1993 used by SparseGPT and
ZipLM), and the remaining weights move by ``-w_c [H^-1]_c,: / [H^-1]_cc``. Units are eliminated greedily, a few
at a time, each step re-costing the rest. Magnitude, the default without data, ranks a unit by its own weights
and cannot see that two units carry the same signal, or that one carries what no other does.

Measured (issue 13, MiniLM FFN -30 %, 400 docstrings + 2000 general sentences, judged on the everyday development
sentences, refit and no training; docs/experiments/ffn_unit_choice_scratch.py): magnitude 0.937, the units'
output energy ``E[x_c^2] |w_c|^2`` 0.939, this, ranked block by block on the model pruned so far, 0.9537; ranked
on the original for every block at once, 0.9543: so the pass ranks every block in one pass before pruning.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.core import Model

DAMP = 1e-3      # of the mean diagonal: a unit that never fires on the texts makes H singular
# Units eliminated between re-costings. A step's units are chosen by the costs at its start, so two units that
# stand in for each other can both go in one step (tests/test_unit_choice.py shows it with 2 of 4); 1 is exact
# greedy OBS. 16 of MiniLM's 1536 is what the measured runs used (docs/distillation.md); 1 measured no better
# (refit only, no training, development sentences: 0.9545 / min 0.8497 against 16's 0.9543 / 0.8533).
STEP = 16


def unit_scores(model: Model, blocks: list[tuple[str, str]], batches: Iterable[tuple],
                run: Callable[[Model, tuple], Any], amount: float) -> dict[str, torch.Tensor]:
    """fc1 name -> one score per hidden unit of its block, lowest first out: the units ``eliminate`` removes get
    their elimination order (0, 1, ...), the others rank above them. ``amount`` of each block goes, counted as
    Torch-Pruning counts (``n - int(n * (1 - amount))``)."""
    moments = hidden_moments(model, [fc2 for _, fc2 in blocks], batches, run)
    scores = {}
    for fc1, fc2 in blocks:
        weight = model.module.get_submodule(fc2).weight.detach()
        n = weight.shape[1]
        scores[fc1] = eliminate(weight, moments[fc2], n - int(n * (1 - amount)))
    return scores


def hidden_moments(model: Model, names: list[str], batches: Iterable[tuple],
                   run: Callable[[Model, tuple], Any]) -> dict[str, torch.Tensor]:
    """``E[[x, 1] [x, 1]^T]`` (float64) of the inputs ``x`` of each Linear of ``names`` over every real token
    of ``run(model, batch)`` for every batch."""
    import torch

    from mmopt.distill.refit import token_mask

    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    seen: dict[str, torch.Tensor] = {}

    def grab(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            seen[name] = args[0].detach()
        return hook

    handles = [model.module.get_submodule(name).register_forward_pre_hook(grab(name)) for name in names]
    try:
        with torch.no_grad():
            for inputs in batches:
                seen.clear()
                run(model, inputs)
                for name, x in seen.items():
                    rows = x.reshape(-1, x.shape[-1])[token_mask(inputs, x)].float()
                    rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
                    term = (rows.T @ rows).double()
                    sums[name] = sums[name] + term if name in sums else term
                    counts[name] += rows.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if not counts[name]]
    if missing:
        raise ValueError(f"no calibration token reached {missing[0]}")
    return {name: sums[name] / counts[name] for name in names}


def eliminate(weight: torch.Tensor, moments: torch.Tensor, count: int, step: int = STEP) -> torch.Tensor:
    """Scores for the ``weight.shape[1]`` input units of a Linear whose inputs have second moments ``moments``
    (with the ones column last, for its bias): the ``count`` units removed greedily by OBS cost, ``step`` at a
    time, score their order; the rest score ``count`` and above, by their final cost."""
    import torch

    n = weight.shape[1]
    h = moments.clone()
    h[:n, :n] += DAMP * torch.diagonal(h)[:n].mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    w = torch.cat([weight.double(), weight.new_zeros(weight.shape[0], 1, dtype=torch.float64)], dim=1)
    scores = torch.empty(n, dtype=torch.float64)
    alive = torch.ones(n + 1, dtype=torch.bool)
    alive[n] = False                        # the bias column is never removed
    removed = 0
    while removed < count:
        cost = w.pow(2).sum(0) / torch.diagonal(hinv)
        cost[~alive] = float("inf")
        chosen = torch.argsort(cost)[:min(step, count - removed)]
        # the chosen units out at once (the same as one by one): the others re-solved through H^-1's block
        block = torch.linalg.inv(hinv[chosen][:, chosen])
        w -= w[:, chosen] @ block @ hinv[chosen]
        hinv -= hinv[:, chosen] @ block @ hinv[chosen]
        w[:, chosen] = 0
        alive[chosen] = False
        scores[chosen] = removed + torch.arange(len(chosen), dtype=scores.dtype)
        removed += len(chosen)
    cost = (w.pow(2).sum(0) / torch.diagonal(hinv))[:n]
    kept = alive[:n]
    scores[kept] = count + torch.argsort(torch.argsort(cost[kept])).double()
    return scores.float()
