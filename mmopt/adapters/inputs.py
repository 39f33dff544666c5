"""Synthetic example inputs the adapters build: random images and random token ids, seeded."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def random_images(batch: int, size: int, dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=dtype or torch.float32)


def random_tokens(batch: int, seq_len: int, vocab: int, low: int = 0, seed: int = 0) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, seq_len), generator=gen)
