"""Measurements of one part shared by ``optimize`` and ``profile``: sizes, peak activation, latency, fidelity."""
from __future__ import annotations

from typing import Any

from mmopt import memory
from mmopt.adapters.base import Shapes


def part_sizes(model: Any, part: str) -> dict:
    return {"params": memory.part_params(model, part), "weight_bytes": memory.part_weight_bytes(model, part)}


def part_runtime(model: Any, adapter: Any, part: str, shapes: Shapes, latency: bool = True) -> dict:
    """Peak activation memory (measured on CUDA or estimated) and latency of one forward at ``shapes``.

    When CUDA runs out of memory the batch is halved until it fits, and the result says at which batch.
    """
    import dataclasses

    import torch

    asked = shapes.batch_size
    while True:
        try:
            out = _runtime_at(model, adapter, part, shapes, latency)
            break
        except torch.cuda.OutOfMemoryError:
            if shapes.batch_size == 1:
                from mmopt.errors import UserError

                raise UserError(f"CUDA ran out of memory running {part} even at batch 1") from None
            torch.cuda.empty_cache()
            shapes = dataclasses.replace(shapes, batch_size=shapes.batch_size // 2)
    out["batch_size"] = shapes.batch_size
    if shapes.batch_size != asked:
        out["note"] = f"CUDA ran out of memory at batch {asked}; {part} measured at batch {shapes.batch_size}"
    return out


def _runtime_at(model: Any, adapter: Any, part: str, shapes: Shapes, latency: bool) -> dict:
    inputs = adapter.example_inputs(model, part, shapes)

    def forward(subject: Any, *args: Any) -> Any:
        return adapter.run(subject, part, args)

    peak = memory.peak_activation(forward, model, inputs)
    out = {"peak_activation_bytes": peak.peak_bytes, "memory_method": peak.method, "memory_how": peak.how,
           "input_bytes": sum(memory.tensor_bytes(t) for t in inputs if hasattr(t, "numel"))}
    if latency:
        out["latency_ms"] = round(memory.latency_ms(lambda *args: forward(model, *args), inputs), 3)
    return out


def embeddings(model: Any, adapter: Any, part: str, batches: Any) -> Any:
    """Concatenated float32 outputs of ``part`` over ``batches``."""
    import torch

    outs = []
    with torch.inference_mode():
        for inputs in batches:
            outs.append(adapter.run(model, part, inputs).float().cpu())
    return torch.cat(outs)


def fidelity(reference: Any, candidate: Any) -> dict:
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


def _neighbours(emb: Any) -> Any:
    import torch

    unit = torch.nn.functional.normalize(emb, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=-1)
