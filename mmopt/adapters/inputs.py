"""Synthetic example inputs the adapters build: random images and random token ids, seeded."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mmopt.core import Model, Shapes


def example_images(model: Model, part: str, shapes: Shapes) -> tuple[torch.Tensor]:
    """Random images for image ``part`` at ``shapes.image_size`` (default: the model's own), in the dtype and on
    the device the part computes in."""
    size = shapes.image_size or model.preprocess["image_size"]
    return (random_images(shapes.batch_size, size, model.part_dtype(part), shapes.seed).to(model.part_device(part)),)


def random_images(batch: int, size: int, dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=dtype or torch.float32)


def random_tokens(batch: int, seq_len: int, vocab: int, low: int = 0, seed: int = 0) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, seq_len), generator=gen)
