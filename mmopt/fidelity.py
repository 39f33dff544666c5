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
    """Mean and min cosine of paired rows, and the share of rows whose nearest neighbour is unchanged."""
    import torch

    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    out = {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6),
           "samples": int(reference.shape[0])}
    if reference.shape[0] >= 3:
        out["neighbor_agreement"] = round(float((_neighbours(reference) == _neighbours(candidate)).float().mean()), 6)
    return out


def _neighbours(emb: torch.Tensor) -> torch.Tensor:
    import torch

    unit = torch.nn.functional.normalize(emb, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=-1)
