"""Bias correction (Nagel et al. 2019, "Data-free quantization through weight equalization and bias correction"):
rounding a layer's weights shifts the mean of its outputs by ``(W_q - W) E[x]``; subtracting that shift from the
layer's bias, with ``E[x]`` the mean of its inputs on calibration data, puts the mean back. It matters where
rounding errors do not average out over a row: depthwise 3x3 filters (9 weights per output channel) and 4-bit
groups. The means are those of the float model (one calibration pass before anything is quantized).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn


class InputMeans:
    """The mean input channel of chosen modules over forward passes (``with InputMeans(modules) as m: run(...)``):
    channels are the last dim of a Linear's input, dim 1 of a convolution's."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "InputMeans":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        import torch

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            rows = x.movedim(1, -1) if isinstance(module, torch.nn.modules.conv._ConvNd) else x
            rows = rows.reshape(-1, rows.shape[-1])
            self.sums[name] = self.sums.get(name, 0) + rows.sum(0)
            self.counts[name] = self.counts.get(name, 0) + rows.shape[0]
        return hook

    def of(self, name: str) -> torch.Tensor | None:
        return self.sums[name] / self.counts[name] if name in self.sums else None


def collect(modules: dict[str, nn.Module], run: Callable[[tuple], object], batches: Iterable[tuple]) -> InputMeans:
    import torch

    means = InputMeans(modules)
    with means, torch.no_grad():
        for batch in batches:
            run(batch)
    return means


def output_shift(float_weight: torch.Tensor, quantized_weight: torch.Tensor, mean: torch.Tensor,
                 groups: int = 1) -> torch.Tensor:
    """``(W_q - W) E[x]`` per output channel. A convolution weight (out, in / groups, kh, kw) sums over its kernel
    (every tap sees the same channel mean; the zero padding at the borders is neglected)."""
    delta = (quantized_weight.float() - float_weight.float()).to(mean.device)
    if delta.dim() > 2:
        delta = delta.sum(dim=tuple(range(2, delta.dim())))
    out, per_group = delta.shape
    mean = mean.float().reshape(groups, 1, per_group)
    return (delta.reshape(groups, out // groups, per_group) * mean).sum(-1).reshape(out)
