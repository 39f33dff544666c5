"""Statistics of chosen modules' inputs, summed over calibration forward passes by forward pre-hooks: the mean
input (bias correction) and ``X^T X`` (GPTQ's Hessian). One class each; the hooks and the loop are here."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn


class InputStatistic:
    """``with Stat(modules) as s: run(...)`` sums ``summand(rows)`` of each module's inputs, as (rows, channels),
    and counts the rows; ``of(name)`` is the sum over the rows seen (None when no input reached the module)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list = []

    def rows_of(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input as (rows, channels): channels are the last dim of a Linear's input."""
        return x.reshape(-1, x.shape[-1]).float()

    def summand(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This batch's term of the sum, and how many rows it counts for."""
        rows = self.rows_of(module, x)
        return self.summand(rows), rows.shape[0]

    def __enter__(self) -> "InputStatistic":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            value, count = self.accumulate(module, args[0].detach())
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value
            self.rows[name] = self.rows.get(name, 0) + count
        return hook

    def of(self, name: str) -> torch.Tensor | None:
        return self.sums[name] / max(1, self.rows[name]) if name in self.sums else None

    @classmethod
    def collect(cls, modules: dict[str, nn.Module], run: Callable[[tuple], object], batches: Iterable[tuple]):
        """The statistic of ``modules``' inputs over ``run(batch)`` for every batch (no gradients)."""
        import torch

        stat = cls(modules)
        with stat, torch.no_grad():
            for batch in batches:
                run(batch)
        return stat
