"""Embedding tables stored as int8 with one float scale per row, dequantized on the fly: only the rows a batch
reads (or the small positional table) exist in float at any time.

- ``Int8Embedding``: an ``nn.Embedding`` whose table is int8 rows;
- ``Int8Rows``: a parametrization storing a bare (rows, width) table Parameter as int8 rows.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


QUANTIZE_BLOCK_ELEMENTS = 1 << 22      # 16 MiB of float32 per block of rows


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 table, float scale per row (rows, 1)) with ``q * scale ~= weight``."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    # A block of rows at a time: a whole table at once holds two float temporaries of its size (ViT-L-14's
    # 150 MB token table: 300 MB) beside the model being quantized.
    rows = max(1, QUANTIZE_BLOCK_ELEMENTS // max(1, w.shape[-1]))
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].float()
        block_scale = (block.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
        q[start:start + rows] = torch.round(block / block_scale).clamp(-127, 127).to(torch.int8)
        scale[start:start + rows] = block_scale
    return q, scale.to(weight.dtype)


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with an int8 table and a float scale per row; rows are dequantized as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # A Parameter (frozen) so it is counted as the part's parameters; the scale is quantization state.
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=dtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype, emb.padding_idx)
        q, scale = quantize_rows(emb.weight)
        new.weight.data, new.scale = q.to(emb.weight.device), scale.to(emb.weight.device)
        return new

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.scale.dtype) * F.embedding(ids, self.scale)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float table these int8 rows stand for (what a loader without mmopt reads)."""
        return (self.weight.to(self.scale.dtype) * self.scale).to(dtype or self.scale.dtype)


class Int8Rows(nn.Module):
    """Parametrization storing a bare (rows, width) table Parameter as int8 + per-row scale.

    Registered with ``torch.nn.utils.parametrize``: ``owner.<name>`` still reads as a float tensor (computed from
    the int8 rows each time it is read), so code such as open_clip's ``x + self.positional_embedding`` runs as is.
    """

    def __init__(self, rows: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(rows, 1, dtype=dtype))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(self.scale.dtype) * self.scale

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        q, scale = quantize_rows(weight)
        self.scale = scale.to(weight.device)
        # a one-tuple: parametrize allows the stored tensor to change dtype only when right_inverse returns a tuple
        return (q,)


def int8_rows_on(owner: nn.Module, name: str) -> None:
    """Store ``owner.<name>`` (a 2-D Parameter) as int8 rows."""
    from torch.nn.utils import parametrize

    param = getattr(owner, name)
    param.requires_grad_(False)          # an int8 Parameter cannot require grad
    parametrize.register_parametrization(owner, name, Int8Rows(param.shape[0], param.dtype).to(param.device),
                                         unsafe=True)
