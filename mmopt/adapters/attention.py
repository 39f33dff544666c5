"""Attention modules with fewer heads than the stock layer they replace, and the mask conversion every
attention module of mmopt shares (this and ``passes/quant_modules.py``).

``nn.MultiheadAttention`` ties its inner width to the model width, so an attention layer that keeps 9 of 12
heads cannot be one; this module keeps the stock parameter names (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``) so checkpoints keep their keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadSlicedAttention(nn.Module):
    """Self-attention with ``num_heads`` heads of ``head_dim`` over an ``embed_dim`` wide residual stream;
    called like ``nn.MultiheadAttention(q, k, v, need_weights=False, attn_mask=...)`` (self-attention only)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool, bias: bool = True):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = embed_dim, num_heads, head_dim, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None,
                key_padding_mask=None, **_: object):
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = additive_mask(attn_mask, key_padding_mask, batch, self.num_heads, length, length, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def additive_mask(attn_mask, key_padding_mask, n: int, heads: int, length: int, src: int, dtype):
    """Both torch mask conventions (bool True = masked out, or additive float) as one additive float mask for
    ``scaled_dot_product_attention``, whose own boolean masks mean the opposite ("keep")."""
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:                          # (N * heads, L, S)
            mask = mask.reshape(n, heads, length, src)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(n, 1, 1, src)
        mask = pad if mask is None else mask + pad
    return mask
