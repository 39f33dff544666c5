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


def fidelity(reference: torch.Tensor, candidate: torch.Tensor, logits: bool = False) -> dict:
    """Mean and min cosine of paired rows, and the share of rows whose nearest neighbour is unchanged. For a
    classifier's ``logits``, also the share of rows whose top-1 class is unchanged (for a one-output head, whose
    sign is: cosine of one number says nothing).

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
    if logits and reference.shape[-1] == 1:
        same = torch.sign(reference[..., 0]) == torch.sign(candidate[..., 0])
        out["sign_agreement"] = round(float(same.float().mean()), 6)
    elif logits:
        out["top1_agreement"] = round(float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()), 6)
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


def compute_in_float32_on_cpu(model: Model, part: str) -> str | None:
    """On a CPU, turn ``part``'s float16/bfloat16 weights into float32 in place, and say so (None when nothing
    was changed).

    Half-precision matrix products run about ten times slower than float32 on a CPU, so comparing a float16
    model's outputs there took most of an optimize run. Computing in float32 keeps the weights' rounding (what
    the cast changed) and leaves out the activations' rounding, which the GPU the model is deployed on decides.
    Parts holding quantized or other special tensors are left as they are: their kernels fix the compute dtype.
    """
    import torch

    half = (torch.float16, torch.bfloat16)
    if model.part_device(part).type != "cpu":
        return None
    tensors = [t for _, t in model.named_tensors(part) if t.is_floating_point()]
    plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) for _, t in model.named_tensors(part))
    dtypes = {t.dtype for t in tensors if t.dtype in half}
    if not dtypes or not plain:
        return None
    for tensor in tensors:
        if tensor.dtype in half:
            tensor.data = tensor.data.float()
    names = "/".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
    return f"{names} weights computed in float32 on the CPU (their rounding counts; activation rounding does not)"
