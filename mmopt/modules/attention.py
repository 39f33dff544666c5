"""Attention modules mmopt installs, and the mask conversion they share.

- ``HeadSlicedAttention``: fewer heads than the stock layer it replaces (``prune: heads``).
  ``nn.MultiheadAttention`` ties its inner width to the model width, so an attention layer that keeps 9 of 12
  heads cannot be one; this module keeps the stock parameter names (``in_proj_weight``, ``in_proj_bias``,
  ``out_proj.weight``) so checkpoints keep their keys.
- ``SplitAttention``: ``nn.MultiheadAttention`` or a fused self-attention as four Linear projections plus
  ``scaled_dot_product_attention``, so bitsandbytes can store every projection (``quantize``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FUSED_WEIGHTS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


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


class SplitAttention(nn.Module):
    """Multi-head attention from four Linear layers and SDPA.

    ``style="mha"`` keeps ``nn.MultiheadAttention``'s call (query, key, value, ..., attn_mask) -> (out, None);
    ``style="self"`` keeps a fused self-attention's call (x, attn_mask) -> out, batch first (open_clip's
    ``Attention``).
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, batch_first: bool,
                 style: str) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first, self.style = embed_dim, num_heads, batch_first, style
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, batch_first={self.batch_first}, style={self.style}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.style == "self":
            return self._forward_self(*args, **kwargs)
        return self._forward_mha(*args, **kwargs)

    def _forward_self(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._attend(x, x, x, attn_mask, None)

    def _forward_mha(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                     average_attn_weights=True, is_causal=False):
        # Callers that quantize (transformer blocks, attentional poolers) never ask for the weights; torch's own
        # default need_weights=True is accepted and answered with None, which those callers discard.
        unbatched = query.dim() == 2
        if unbatched:                                   # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:                      # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self._attend(query, key, value, attn_mask, key_padding_mask, causal=is_causal and attn_mask is None)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _attend(self, q_in, k_in, v_in, attn_mask, key_padding_mask, causal: bool = False) -> torch.Tensor:
        """Batch-first inputs (N, L, E) -> (N, L, E)."""
        n, length, _ = q_in.shape
        src = k_in.shape[1]
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(q_in).reshape(n, length, heads, head_dim).transpose(1, 2)
        k = self.k_proj(k_in).reshape(n, src, heads, head_dim).transpose(1, 2)
        v = self.v_proj(v_in).reshape(n, src, heads, head_dim).transpose(1, 2)
        mask = additive_mask(attn_mask, key_padding_mask, n, heads, length, src, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))


def split_attention_from(module: nn.Module) -> tuple[SplitAttention | None, str]:
    """A SplitAttention equivalent to ``module``, or (None, why not): an ``nn.MultiheadAttention``, or a fused
    self-attention called as (x, attn_mask) -> out whose only weights are ``in_proj_weight``, ``in_proj_bias``
    and ``out_proj`` (which modules those are is the adapter's call: ``QuantLayout.fused_attention``)."""
    ref = module.in_proj_weight if getattr(module, "in_proj_weight", None) is not None else module.out_proj.weight
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            return None, "attention with bias_k/add_zero_attn has no Linear-only form here"
        with ref.device:            # built where the attention is (the meta device: no memory)
            new = SplitAttention(module.embed_dim, module.num_heads, module.kdim, module.vdim,
                                 module.in_proj_bias is not None, module.batch_first, "mha")
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.detach().chunk(3)
        else:
            weights = (module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach())
    else:
        # anything else it holds (a scaled-cosine logit scale, head scales, q/k or inner norms) changes the maths
        extra = {name for name, _ in module.named_parameters()} - FUSED_WEIGHTS
        if extra:
            return None, "attention with scaled cosine, head scale or inner norms is kept fused"
        dim = module.in_proj_weight.shape[1]
        with ref.device:
            new = SplitAttention(dim, module.num_heads, dim, dim, module.in_proj_bias is not None, True, "self")
        weights = module.in_proj_weight.detach().chunk(3)
    biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    with torch.no_grad():
        for proj, weight, bias in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(weight)
            if bias is not None:
                proj.bias.copy_(bias)
        new.out_proj.weight.copy_(module.out_proj.weight)
        if module.out_proj.bias is not None:
            new.out_proj.bias.copy_(module.out_proj.bias)
        else:
            new.out_proj.bias = None
    return new.to(device=ref.device, dtype=ref.dtype), ""


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
