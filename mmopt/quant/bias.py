"""Bias correction (Nagel et al. 2019, "Data-free quantization through weight equalization and bias correction"):
rounding a layer's weights shifts the mean of its outputs by ``(W_q - W) E[x]``; subtracting that shift from the
layer's bias, with ``E[x]`` the mean of its inputs on calibration data, puts the mean back. It matters where
rounding errors do not average out over a row: depthwise 3x3 filters (9 weights per output channel) and 4-bit
groups. The means are those of the float model (one calibration pass before anything is quantized).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from mmopt.quant.inputs import InputStatistic

if TYPE_CHECKING:
    import torch
    from torch import nn


class InputMeans(InputStatistic):
    """The mean input channel of chosen modules: channels are the last dim of a Linear's input, dim 1 of a
    convolution's."""

    def rows_of(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        import torch

        rows = x.float().movedim(1, -1) if isinstance(module, torch.nn.modules.conv._ConvNd) else x.float()
        return rows.reshape(-1, rows.shape[-1])

    def summand(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.sum(0)


def collect(modules: dict[str, nn.Module], run: Callable[[tuple], object], batches: Iterable[tuple]) -> InputMeans:
    return InputMeans.collect(modules, run, batches)


def output_shift(float_weight: torch.Tensor, quantized_weight: torch.Tensor, mean: torch.Tensor,
                 groups: int = 1) -> torch.Tensor:
    """``(W_q - W) E[x]`` per output channel."""
    return mean_response(quantized_weight.float() - float_weight.float(), mean, groups)


def mean_response(weight: torch.Tensor, mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``W E[x]`` per output channel: what a layer's outputs get from inputs held at their means. A convolution
    weight (out, in / groups, kh, kw) sums over its kernel (every tap sees the same channel mean; the zero padding
    at the borders is neglected)."""
    weight = weight.float().to(mean.device)
    if weight.dim() > 2:
        weight = weight.sum(dim=tuple(range(2, weight.dim())))
    out, per_group = weight.shape
    mean = mean.float().reshape(groups, 1, per_group)
    return (weight.reshape(groups, out // groups, per_group) * mean).sum(-1).reshape(out)
