"""GPTQ (Frantar et al. 2022) for 4-bit weight groups, on CPU or GPU, pure torch.

A Linear layer's weight ``W`` (out, in) is quantized one input column at a time; each column's rounding error is
spread over the columns not yet quantized through the inverse of ``H = X^T X``, the second moment of the layer's
inputs on calibration data, so the layer's *output* on those inputs moves as little as possible (round-to-nearest
minimises the weight error instead). Options as in the reference implementation and the research of issue #14
(MiniLM dev cosine: RTN g64 0.9725, GPTQ g64 0.9808, GPTQ + act-order g32 0.9859):

- act-order: columns in order of decreasing ``H`` diagonal (the inputs with the most energy first, while the
  error can still be compensated); groups stay *static* (each group's scale and zero point fitted on the original
  weights beforehand), so a group still covers consecutive inputs and the storage is the plain groups of
  ``modules.quantized.Int4Linear``;
- damping: ``damp * mean(diag H)`` added to the diagonal (1 %, GPTQ's default), raised tenfold while the Cholesky
  factorisation fails (rank-deficient Hessians from few calibration tokens);
- dead inputs (always zero in calibration) are zeroed, as their columns never matter on these inputs.

Why our own and not a library (checked for issue #14): llmcompressor and gptqmodel are built for GPUs and LLMs
(gptqmodel compiles CUDA kernels; llmcompressor pulls in accelerate, datasets and a model-tracing stack) and
auto-round tunes by gradient descent, hours on a CPU; GPTQ itself is the short loop below and runs on a CPU in
seconds for a MiniLM-sized model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from mmopt.quant.inputs import InputStatistic

if TYPE_CHECKING:
    import torch
    from torch import nn

DAMP = 0.01          # GPTQ's default damping, a share of the mean Hessian diagonal
BLOCK = 128          # columns per lazy-batch update (the reference implementation's block size)


@dataclass
class Quantized4:
    """A weight in 4-bit groups: ``codes`` (out, in) 0..15, ``scale`` float16-exact and ``zero`` (out, groups),
    and its output error on the calibration inputs relative to the output's energy (``tr(dW H dW^T) /
    tr(W H W^T)``), or on the weights themselves when no Hessian was given."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    rel_error: float = 0.0

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        group_size = self.group_size
        q = self.codes.float().reshape(rows, cols // group_size, group_size)
        return ((q - self.zero.float().unsqueeze(-1)) * self.scale.float().unsqueeze(-1)).reshape(rows, cols)


class Hessians(InputStatistic):
    """``X^T X`` of the inputs of chosen Linear modules: one float32 (in, in) matrix per module; ``of`` is the mean
    ``x x^T``."""

    def summand(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T @ rows


def collect(modules: dict[str, nn.Module], run: Callable[[tuple], object], batches: Iterable[tuple]) -> Hessians:
    """Hessians of ``modules``' inputs over ``run(batch)`` for every batch (no gradients)."""
    return Hessians.collect(modules, run, batches)


def round_to_nearest(weight: torch.Tensor, group_size: int, hessian: torch.Tensor | None = None) -> Quantized4:
    """4-bit groups by rounding to nearest, each group's range chosen by the clipping search of
    ``quantize_groups4``; the error is measured with ``hessian`` when given."""
    from mmopt.modules.quantized import quantize_groups4

    codes, scale, zero = quantize_groups4(weight, group_size)
    scale = scale.half().float()
    codes = _codes(weight.detach().float(), scale, zero.float(), group_size)
    out = Quantized4(codes, scale, zero, group_size)
    out.rel_error = relative_error(weight, out.dequantize(), hessian)
    return out


def gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, act_order: bool = True,
         damp: float = DAMP) -> Quantized4:
    """GPTQ of ``weight`` (out, in) with ``hessian`` (in, in): 4-bit groups of ``group_size`` inputs (static groups
    fitted like ``round_to_nearest``), columns in act-order unless told otherwise."""
    import torch

    from mmopt.modules.quantized import quantize_groups4

    original = weight.detach().float()
    W = original.clone()
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    _, scale, zero = quantize_groups4(W, group_size)
    scale, zero = scale.half().float().to(W.device), zero.float().to(W.device)   # the stored (float16) scale
    cols = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group = perm // group_size
    col_scale, col_zero = scale[:, group], zero[:, group]
    hinv = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            q = torch.round(W1[:, i] / s + z).clamp(0, 15)
            Q[:, i1 + i] = q
            err = (W1[:, i] - (q - z) * s) / H1[i, i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            errors[:, i] = err
        W[:, i2:] -= errors @ hinv[i1:i2, i2:]
    codes = Q[:, torch.argsort(perm)].to(torch.uint8)
    out = Quantized4(codes, scale, zero.to(torch.uint8), group_size)
    out.rel_error = relative_error(original, out.dequantize(), hessian)
    return out


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Output error energy / output energy on the calibration inputs: ``tr(dW H dW^T) / tr(W H W^T)``; without a
    Hessian, of the weights (``|dW|^2 / |W|^2``)."""
    w = weight.detach().float()
    delta = approx.float().to(w.device) - w
    if hessian is None:
        return float(delta.pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
    h = hessian.float().to(w.device)
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum().clamp(min=1e-30))


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    import torch

    rows, cols = w.shape
    wg = w.reshape(rows, cols // group_size, group_size)
    q = torch.round(wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15)
    return q.reshape(rows, cols).to(torch.uint8)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` after damping; the damping grows tenfold until ``H`` factorises."""
    import torch

    mean = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(4):
        try:
            lower = torch.linalg.cholesky(H + eye * damp * 10 ** attempt * mean)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    from mmopt.errors import DataError

    raise DataError(f"quantize: a calibration Hessian does not factorise even with damping {damp * 1000:g} x its "
                    "mean diagonal",
                    hint="give more calibration samples, or algorithm: rtn")
