"""GPTQ (Frantar et al. 2022) for 4-bit weight groups and int8 rows, on CPU or GPU, pure torch.

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

int8 rows (``gptq_int8``) keep round-to-nearest's storage (one ``max|row| / 127`` scale per output channel, or per
group of a row's values with ``int8_group_size``) and only choose the codes. Convolutions are covered through their
im2col patches, one Hessian per group: a depthwise 3x3 convolution's 9 inputs per channel are where round-to-nearest
hurts MobileNetV2 most (docs/quantization.md), and error feedback within those 9 taps recovers most of it.

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


@dataclass
class Quantized8:
    """A weight as int8 rows: ``codes`` (the weight's shape, int8), ``scale`` (out, 1) in the weight's dtype, or
    with ``group_size`` float16 (out, groups) over each row's flattened values (``modules.quantized.Int8Groups``),
    and the output error as in ``Quantized4``."""

    codes: torch.Tensor
    scale: torch.Tensor
    rel_error: float = 0.0
    group_size: int | None = None


class Hessians(InputStatistic):
    """``X^T X`` of the inputs of chosen Linear modules and 2-D convolutions: one float32 (in, in) matrix per Linear;
    per convolution one (n, n) matrix per group of its im2col patches (``n`` = in / groups * kh * kw); ``of`` is
    the mean ``x x^T``."""

    def summand(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T @ rows

    def accumulate(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch
        from torch.nn import functional as F

        if not isinstance(module, torch.nn.Conv2d):
            return super().accumulate(module, x)
        total, count = None, 0
        # one image at a time: a batch's im2col patches of a wide 3x3 convolution would take gigabytes
        for image in x.float().split(1):
            cols = F.unfold(image, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)[0]
            cols = cols.reshape(module.groups, -1, cols.shape[-1])
            h = cols @ cols.transpose(1, 2)
            total = h if total is None else total + h
            count += cols.shape[-1]
        return total, count


def covers(module: nn.Module) -> bool:
    """Whether GPTQ can take ``module``: a Linear, or a 2-D convolution with numeric zero padding (its patches are
    what ``F.unfold`` gives)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return (isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def collect(modules: dict[str, nn.Module], run: Callable[[tuple], object], batches: Iterable[tuple]) -> Hessians:
    """Hessians of ``modules``' inputs (Linear layers, convolutions GPTQ ``covers``) over ``run(batch)`` for every
    batch (no gradients)."""
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
    W, H = _without_dead_inputs(original[None], hessian.detach().float()[None].to(original.device))
    _, scale, zero = quantize_groups4(W[0], group_size)
    scale, zero = scale.half().float().to(W.device), zero.float().to(W.device)   # the stored (float16) scale

    def quantize_column(w: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        group = int(columns[0]) // group_size
        s, z = scale[:, group], zero[:, group]
        return torch.round(w / s + z).clamp(0, 15), lambda q: (q - z) * s

    codes = _error_feedback(W, H, quantize_column, act_order, damp)[0].to(torch.uint8)
    out = Quantized4(codes, scale, zero.to(torch.uint8), group_size)
    out.rel_error = relative_error(original, out.dequantize(), hessian)
    return out


def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, act_order: bool = True, damp: float = DAMP,
              group_size: int | None = None) -> Quantized8:
    """GPTQ of ``weight`` into int8 rows: one symmetric scale per output channel (``max|row| / 127``, the scale of
    round-to-nearest, so the storage is unchanged) or, with ``group_size`` (a divisor of the row's length), one
    per that many values of a row (``quantize_groups8``'s static groups); the codes chosen with error feedback.
    ``weight`` is a Linear's (out, in) or a convolution's (out, in / groups, kh, kw); ``hessian`` is (n, n), or
    (groups, n, n) with ``n`` the inputs of one group's filters (a depthwise 3x3 convolution: one 9x9 matrix per
    channel)."""
    import torch

    from mmopt.modules.embedding import quantize_rows
    from mmopt.modules.quantized import quantize_groups8

    original = weight.detach()
    rows = original.reshape(original.shape[0], -1).float()
    h = hessian.detach().float().to(rows.device)
    h = h if h.dim() == 3 else h[None]
    groups, width = h.shape[0], rows.shape[1]
    if group_size is None:
        _, scale = quantize_rows(original.reshape(original.shape[0], -1))
        per_value = scale.float().expand(-1, width)
    else:
        _, scale = quantize_groups8(rows, group_size)
        per_value = scale.float().repeat_interleave(group_size, dim=1)
    stored = per_value.reshape(groups, -1, width)      # each value's scale as stored
    W, H = _without_dead_inputs(rows.reshape(groups, -1, width), h)
    index = torch.arange(groups, device=rows.device)

    def quantize_column(w: torch.Tensor, columns: torch.Tensor) -> tuple:
        s = stored[index, :, columns]
        return torch.round(w / s).clamp(-127, 127), lambda q: q * s

    codes = _error_feedback(W, H, quantize_column, act_order, damp)
    delta = codes * stored - W
    # tr(dW H dW^T) / tr(W H W^T), summed over the groups
    energy = torch.einsum("goi,gij,goj->", W, H, W).clamp(min=1e-30)
    out = Quantized8(codes.to(torch.int8).reshape(original.shape), scale, group_size=group_size)
    out.rel_error = float(torch.einsum("goi,gij,goj->", delta, H, delta) / energy)
    return out


def _without_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that were always zero in calibration get a unit diagonal and a zero weight column (they never
    matter on these inputs, and would make ``H`` singular). ``W`` (groups, out, n), ``H`` (groups, n, n)."""
    import torch

    dead = torch.diagonal(H, dim1=1, dim2=2) == 0
    return W * (~dead).unsqueeze(1), H + torch.diag_embed(dead.float())


def _error_feedback(W: torch.Tensor, H: torch.Tensor, quantize_column: Callable, act_order: bool,
                    damp: float) -> torch.Tensor:
    """GPTQ's loop over columns, batched over independent groups: ``W`` (groups, out, n), ``H`` (groups, n, n).
    ``quantize_column(w (groups, out), columns (groups,))`` gives the codes of a column (by its original index)
    and a function from codes to their values; each column's error is spread over the columns not yet quantized.
    Returns the codes (groups, out, n) in the original column order."""
    import torch

    groups, rows, cols = W.shape
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=-1, descending=True)
    else:
        perm = torch.arange(cols, device=W.device).expand(groups, cols)
    W = torch.gather(W, 2, perm.unsqueeze(1).expand(groups, rows, cols)).clone()
    H = torch.gather(torch.gather(H, 1, perm.unsqueeze(2).expand(groups, cols, cols)), 2,
                     perm.unsqueeze(1).expand(groups, cols, cols))
    hinv = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1, H1 = W[:, :, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q, value = quantize_column(W1[:, :, i], perm[:, i1 + i])
            Q[:, :, i1 + i] = q
            err = (W1[:, :, i] - value(q)) / H1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= err.unsqueeze(2) * H1[:, i, i:].unsqueeze(1)
            errors[:, :, i] = err
        W[:, :, i2:] -= errors @ hinv[:, i1:i2, i2:]
    return torch.gather(Q, 2, torch.argsort(perm, dim=-1).unsqueeze(1).expand(groups, rows, cols))


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
    """The upper Cholesky factors of ``H^-1`` (batched: (groups, n, n)) after damping; the damping grows tenfold
    until every ``H`` factorises."""
    import torch

    mean = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(H.shape[-1], device=H.device)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(H + eye * damp * 10 ** attempt * mean)
        if not bool(info.any()):
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    from mmopt.errors import DataError

    raise DataError(f"quantize: a calibration Hessian does not factorise even with damping {damp * 1000:g} x its "
                    "mean diagonal",
                    hint="give more calibration samples, or algorithm: rtn")
