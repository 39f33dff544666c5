"""Module swaps that turn every matrix multiply of a model into an ``nn.Linear`` (so bitsandbytes can store it),
and per-row int8 embedding tables.

Each swap is numerically equivalent to what it replaces (up to float rounding) and is checked by a test:
- ``SplitAttention``: ``nn.MultiheadAttention`` or open_clip's ``Attention`` (fused ``in_proj_weight``, a bare
  parameter) as four Linear projections plus ``scaled_dot_product_attention``;
- ``PatchLinear``: a convolution whose kernel equals its stride (a ViT patch embedding) as a Linear over
  flattened patches, returning the convolution's (N, C, h, w) layout;
- ``MatmulLinear``: a bare projection matrix used as ``x @ P`` (CLIP's ``proj``, ``text_projection``);
- ``Int8Embedding`` / ``Int8Rows``: embedding tables stored as int8 with one float scale per row and dequantized
  on the fly: only the rows a batch reads (or the small positional table) exist in float at any time.

Only torch is imported here; bitsandbytes stays in ``quantize.py``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmopt.adapters.attention import HeadSlicedAttention, additive_mask


# --- attention ---------------------------------------------------------------------------------------------

class SplitAttention(nn.Module):
    """Multi-head attention from four Linear layers and SDPA.

    ``style="mha"`` keeps ``nn.MultiheadAttention``'s call (query, key, value, ..., attn_mask) -> (out, None);
    ``style="open_clip"`` keeps open_clip ``Attention``'s call (x, attn_mask) -> out (batch first).
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
        if self.style == "open_clip":
            return self._forward_open_clip(*args, **kwargs)
        return self._forward_mha(*args, **kwargs)

    def _forward_open_clip(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._attend(x, x, x, attn_mask, None)

    def _forward_mha(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                     average_attn_weights=True, is_causal=False):
        # Callers that quantize (open_clip's blocks, its attentional pooler) never ask for the weights; torch's own
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
    """A SplitAttention equivalent to ``module`` (``nn.MultiheadAttention`` or open_clip ``Attention``), or
    (None, why not)."""
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            return None, "attention with bias_k/add_zero_attn has no Linear-only form here"
        new = SplitAttention(module.embed_dim, module.num_heads, module.kdim, module.vdim,
                             module.in_proj_bias is not None, module.batch_first, "mha")
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.detach().chunk(3)
        else:
            weights = (module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach())
        biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    elif is_fused_attention(module):
        plain = (getattr(module, "logit_scale", None) is None and getattr(module, "head_scale", None) is None
                 and all(isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("ln_q", "ln_k", "ln_inner")))
        if not plain:
            return None, "attention with scaled cosine, head scale or inner norms is kept fused"
        dim = module.in_proj_weight.shape[1]
        new = SplitAttention(dim, module.num_heads, dim, dim, module.in_proj_bias is not None, True, "open_clip")
        weights = module.in_proj_weight.detach().chunk(3)
        biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    else:
        return None, "not an attention module"
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
    ref = module.in_proj_weight if getattr(module, "in_proj_weight", None) is not None else module.out_proj.weight
    return new.to(device=ref.device, dtype=ref.dtype), ""


def is_fused_attention(module: nn.Module) -> bool:
    """open_clip's own ``Attention``: a bare fused ``in_proj_weight`` and an ``out_proj``, called as (x, attn_mask).
    Head-pruned attention (``HeadSlicedAttention``: heads narrower than width / heads) is not one: splitting it
    assumes the stock head width, so it stays in float and is reported as not covered."""
    return (not isinstance(module, (nn.MultiheadAttention, HeadSlicedAttention))
            and isinstance(getattr(module, "in_proj_weight", None), torch.Tensor)
            and isinstance(getattr(module, "out_proj", None), nn.Linear) and hasattr(module, "num_heads"))


# --- patch embedding -----------------------------------------------------------------------------------------

class PatchLinear(nn.Module):
    """A conv with kernel == stride, no padding/dilation/groups, as a Linear over flattened (C, kh, kw) patches."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], bias: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, tuple(kernel)
        self.linear = nn.Linear(in_channels * kernel[0] * kernel[1], out_channels, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        kh, kw = self.kernel
        h, w = height // kh, width // kw
        x = x[:, :, : h * kh, : w * kw].reshape(n, c, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5)
        # (N, h*w, K), not (N, h, w, K): bitsandbytes' int8 CPU kernel takes its row statistics over dim -2 of 3-D
        out = self.linear(x.reshape(n, h * w, c * kh * kw))
        return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def is_patch_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == tuple(module.stride)
            and tuple(module.padding) == (0, 0) and tuple(module.dilation) == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def patch_linear_from(conv: nn.Conv2d) -> PatchLinear:
    new = PatchLinear(conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None)
    with torch.no_grad():
        new.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
        if conv.bias is not None:
            new.linear.bias.copy_(conv.bias)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


# --- bare projection matrices --------------------------------------------------------------------------------

class MatmulLinear(nn.Module):
    """A bare (in, out) matrix ``P`` used as ``x @ P``, held as ``Linear(in, out)``: ``x @ self`` still works."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def matmul_linear_from(matrix: torch.Tensor) -> MatmulLinear:
    new = MatmulLinear(matrix.shape[0], matrix.shape[1])
    with torch.no_grad():
        new.linear.weight.copy_(matrix.detach().T)
    return new.to(device=matrix.device, dtype=matrix.dtype)


# --- int8 embedding tables -----------------------------------------------------------------------------------

def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 table, float scale per row (rows, 1)) with ``q * scale ~= weight``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
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
