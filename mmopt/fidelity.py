"""How close the optimized model's outputs are to the original's: cosine of paired outputs and the share of
items whose nearest neighbour is unchanged."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

    from mmopt.adapters.base import Adapter
    from mmopt.core import Model


def embeddings(model: Model, adapter: Adapter, part: str, batches: Iterable[tuple]) -> torch.Tensor:
    """Concatenated float32 outputs of ``part`` over ``batches``."""
    import torch

    outs = []
    with torch.inference_mode():
        for inputs in batches:
            outs.append(adapter.run(model, part, inputs).float().cpu())
    return torch.cat(outs)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Mean and min cosine of paired rows, and the share of rows whose nearest neighbour is unchanged.

    Outputs nothing can be learned from (NaN, all-zero rows, one output for every input) are named under
    ``degenerate`` (``{"optimized": "...", "original": "..."}``); every fidelity gate then fails, whatever the
    cosine says (a zero output has cosine 0 with anything, a constant one can still agree on neighbours).
    """
    import math

    import torch

    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    finite = lambda v: round(v, 6) if math.isfinite(v) else None  # noqa: E731 - NaN is not JSON
    out = {"mean_cosine": finite(float(cos.mean())), "min_cosine": finite(float(cos.min())),
           "samples": int(reference.shape[0])}
    if reference.shape[0] >= 3:
        out["neighbor_agreement"] = round(float((_neighbours(reference) == _neighbours(candidate)).float().mean()), 6)
    problems = {side: problem for side, outputs in (("optimized", candidate), ("original", reference))
                if (problem := degenerate(outputs)) is not None}
    if problems:
        out["degenerate"] = problems
    return out


def degenerate(outputs: torch.Tensor) -> str | None:
    """Why ``outputs`` (rows = inputs) carry no information, or None: NaN/inf, all-zero rows, all rows equal."""
    import torch

    rows = outputs.shape[0]
    if not bool(torch.isfinite(outputs).all()):
        bad = int((~torch.isfinite(outputs)).any(dim=-1).sum())
        return f"NaN or infinite outputs for {bad} of {rows} inputs"
    zero = int((outputs.flatten(1).abs().amax(dim=-1) == 0).sum())
    if zero:
        return f"all-zero outputs for {zero} of {rows} inputs"
    if rows >= 2 and bool((outputs == outputs[:1]).all()):
        return f"the same output for all {rows} inputs"
    return None


def _neighbours(emb: torch.Tensor) -> torch.Tensor:
    import torch

    unit = torch.nn.functional.normalize(emb, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=-1)
