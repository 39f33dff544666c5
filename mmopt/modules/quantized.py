"""Weight-only quantized storage the quantize pass installs by default (``method: int8``):

- ``int8_tensor``: torchao's ``Int8Tensor`` (int8 + one float32 scale per row, or a float16 one per group of a
  row with ``int8_group_size``) for an ``nn.Linear`` or
  ``nn.Embedding`` weight. The module stays the stock one, so transformers (``TorchAoConfig``) rebuilds the
  same model from the same file; torchao runs it as ``mm(x, q.t().to(x.dtype)) * scale`` (a float matmul
  after a cast, the same ops on CPU and CUDA), and an embedding as a lookup in the dequantized table.
- ``Int8Channels``: a parametrization storing a convolution weight as int8 with one scale per output channel
  (1x1 convolutions are matrix multiplies; depthwise and the first conv are covered the same way);
  ``Int8Groups`` the same with one float16 scale per group of a filter's values (``int8_group_size``).
- ``Int4Embedding``: an embedding table in 4-bit groups (asymmetric, range chosen per group by a small clipping
  search), two codes per byte; only the looked-up rows are dequantized.
- ``Int4Linear``: a Linear weight in the same 4-bit groups (``method: int4``; codes from GPTQ or round-to-nearest).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from mmopt.modules.embedding import quantize_rows

if TYPE_CHECKING:
    from mmopt.quant.gptq import Quantized8


def int8_tensor(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """A torchao ``Int8Tensor`` for a 2-D ``weight``: per-row symmetric int8 (``max|row| / 127``) or, where
    ``int8_group_for`` gives a group, one float16 scale per group of a row; dequantizing to ``weight.dtype`` (the
    dtype it will compute in: an Int8Tensor's output dtype is fixed when it is made)."""
    from torchao.quantization import Int8Tensor

    size = int8_group_for(weight.shape[1], group_size)
    if size is None:
        q, scale = quantize_rows(weight)
        return Int8Tensor(q, scale.float(), block_size=[1, weight.shape[1]], dtype=weight.dtype)
    q, scale = quantize_groups8(weight, size)
    return Int8Tensor(q, scale, block_size=[1, size], dtype=weight.dtype)


def int8_rows_of(weight: torch.Tensor, codes: Quantized8 | None, group_size: int | None = None) -> torch.Tensor:
    """``weight`` as an ``Int8Tensor``: GPTQ's ``codes`` when given, rounded to nearest otherwise (in groups of
    ``group_size`` where ``int8_group_for`` allows)."""
    if codes is None:
        return int8_tensor(weight.detach(), group_size)
    scale = codes.scale if codes.group_size else codes.scale.float()
    return int8_tensor_from(codes.codes, scale, weight.dtype)


def int8_tensor_from(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An ``Int8Tensor`` from its saved inner tensors (``<module>._weight_qdata`` / ``._weight_scale``): one scale
    per row, or per group of ``qdata.shape[1] // scale.shape[1]`` values."""
    from torchao.quantization import Int8Tensor

    return Int8Tensor(qdata, scale, block_size=[1, qdata.shape[1] // scale.shape[1]], dtype=dtype)


def int8_group_for(width: int, group_size: int | None) -> int | None:
    """The int8 group a row of ``width`` values gets under ``int8_group_size``: the largest divisor of ``width``
    from ``group_size`` down to half of it (MobileNetV2's 24-channel inputs: 12 for 16); None, one scale for the
    row, without a group size, when the row is no longer than a group or when no such divisor exists."""
    if group_size is None or width <= group_size:
        return None
    return next((d for d in range(group_size, (group_size + 1) // 2 - 1, -1) if width % d == 0), None)


def quantize_groups8(rows: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per ``group_size`` consecutive values of each row (a divisor of the row's length): (int8
    codes, float16 scale (rows, groups)); the codes are rounded with the float16 scale that is stored."""
    w = rows.detach().float()
    groups = w.reshape(w.shape[0], -1, group_size)
    scale = (groups.abs().amax(-1) / 127.0).clamp(min=1e-7).half()
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-127, 127)
    return q.reshape(w.shape).to(torch.int8), scale


def is_int8_tensor(tensor: object) -> bool:
    return type(tensor).__name__ == "Int8Tensor"


class Int8Channels(nn.Module):
    """Parametrization storing a convolution weight (out, in/groups, kh, kw) as int8, one scale per output channel."""

    def __init__(self, channels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels, 1, dtype=dtype))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        flat = q.reshape(q.shape[0], -1).to(self.scale.dtype) * self.scale
        return flat.reshape(q.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        q, scale = quantize_rows(weight.reshape(weight.shape[0], -1))
        self.scale = scale.to(weight.device)
        return (q.reshape(weight.shape),)     # a one-tuple: lets parametrize change the stored dtype


class Int8Groups(nn.Module):
    """Parametrization storing a convolution weight (out, in/groups, kh, kw) as int8 with one float16 scale per
    ``group_size`` consecutive values of each output channel's flattened filter (``int8_group_size``)."""

    def __init__(self, channels: int, filter_size: int, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.group_size, self.dtype = group_size, dtype
        self.register_buffer("scale", torch.ones(channels, filter_size // group_size, dtype=torch.float16))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        groups = q.reshape(q.shape[0], -1, self.group_size).to(self.dtype)
        return (groups * self.scale.to(self.dtype).unsqueeze(-1)).reshape(q.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        q, self.scale = quantize_groups8(weight.reshape(weight.shape[0], -1), self.group_size)
        return (q.reshape(weight.shape),)


def int8_channels_on(conv: nn.Module, codes: Quantized8 | None = None, group_size: int | None = None) -> None:
    """Store ``conv.weight`` as int8, one scale per output channel or, where ``int8_group_for`` gives a group of
    its filter values, one per group (``Int8Groups``): GPTQ's ``codes`` when given, rounded to nearest otherwise."""
    from torch.nn.utils import parametrize

    weight = conv.weight
    weight.requires_grad_(False)
    filter_size = weight[0].numel()
    size = int8_group_for(filter_size, group_size)
    storage = (Int8Channels(weight.shape[0], weight.dtype) if size is None
               else Int8Groups(weight.shape[0], filter_size, size, weight.dtype))
    parametrize.register_parametrization(conv, "weight", storage.to(weight.device), unsafe=True)
    if codes is not None:
        stored = conv.parametrizations.weight
        stored.original0.data = codes.codes.to(weight.device)     # right_inverse returned a one-tuple
        stored[0].scale = codes.scale.to(device=weight.device, dtype=stored[0].scale.dtype)


# --- 4-bit groups ----------------------------------------------------------------------------------------------

def quantize_groups4(weight: torch.Tensor, group_size: int, grid: int = 20, max_shrink: float = 0.25
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes (0..15) per ``group_size`` consecutive values of a row: (codes uint8, scale (rows,
    groups), zero (rows, groups) uint8) with ``w ~ (q - zero) * scale``. Each group's range is shrunk by the factor
    in ``1 - k/grid * max_shrink`` that minimises its squared error (GPTQ's ``mse`` search)."""
    w = weight.detach().float()
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group_size, group_size)
    best = torch.full(wg.shape[:2], float("inf"), device=w.device)
    scale = zero = None
    for k in range(grid + 1):
        shrink = 1 - k / grid * max_shrink
        lo = (wg.amin(-1) * shrink).clamp(max=0)
        hi = (wg.amax(-1) * shrink).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-10)
        z = torch.round(-lo / s).clamp(0, 15)
        q = torch.round(wg / s[..., None] + z[..., None]).clamp(0, 15)
        err = ((q - z[..., None]) * s[..., None] - wg).pow(2).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = s if scale is None else torch.where(better, s, scale)
        zero = z if zero is None else torch.where(better, z, zero)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q.reshape(rows, cols).to(torch.uint8), scale, zero.to(torch.uint8)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim, low nibble first."""
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, (packed >> 4) & 0xF], dim=-1).reshape(*packed.shape[:-1], -1)


class Packed4bit(nn.Parameter):
    """A frozen uint8 Parameter holding two 4-bit codes per byte; ``logical_shape`` is the table it stands for
    (``memory.counting.logical_numel`` counts parameters by it). Kept through copies, which plain attributes of a
    Parameter are not."""

    def __new__(cls, data: torch.Tensor, logical_shape: tuple[int, ...]) -> "Packed4bit":
        param = super().__new__(cls, data, requires_grad=False)
        param.logical_shape = tuple(logical_shape)
        return param

    def __deepcopy__(self, memo: dict) -> "Packed4bit":
        new = Packed4bit(self.data.clone(), self.logical_shape)
        memo[id(self)] = new
        return new


class Int4Embedding(nn.Module):
    """``nn.Embedding`` with a 4-bit table: packed codes, a float16 scale and a uint8 zero point per group."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size, self.dtype = group_size, dtype
        groups = embedding_dim // group_size
        # packed codes as a frozen Parameter: counted among the part's parameters, as the table it stands for
        self.weight = Packed4bit(torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8),
                                 (num_embeddings, embedding_dim))
        self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(num_embeddings, groups, dtype=torch.uint8))

    @staticmethod
    def fits(emb: nn.Embedding, group_size: int) -> bool:
        return emb.embedding_dim % group_size == 0 and emb.embedding_dim % 2 == 0

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int) -> "Int4Embedding":
        with emb.weight.device:     # the meta device too (a streamed model)
            new = cls(emb.num_embeddings, emb.embedding_dim, group_size, emb.weight.dtype, emb.padding_idx)
        codes, scale, zero = quantize_groups4(emb.weight, group_size)
        device = emb.weight.device
        new.weight.data = pack4(codes).to(device)
        new.scale, new.zero = scale.to(torch.float16).to(device), zero.to(device)
        return new

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, 4-bit groups of {self.group_size}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = unpack4(F.embedding(ids, self.weight)).to(torch.float32)
        groups = codes.reshape(*codes.shape[:-1], -1, self.group_size)
        zero = F.embedding(ids, self.zero).to(torch.float32).unsqueeze(-1)
        scale = F.embedding(ids, self.scale).to(torch.float32).unsqueeze(-1)
        return ((groups - zero) * scale).reshape(codes.shape).to(self.dtype)


class Int4Linear(nn.Module):
    """``nn.Linear`` with its weight in 4-bit groups along the input: the storage of ``Int4Embedding`` (packed
    codes 0..15, a float16 scale and a uint8 zero point per group, ``w = (q - zero) * scale``). The weight is
    dequantized for each forward (weight-only, like torchao's int8: no activation quantization). The codes come
    from ``mmopt.quant`` (GPTQ or round-to-nearest); the module only stores and runs them."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.weight = Packed4bit(torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                                 (out_features, in_features))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        # open_clip reads its compute dtype from the first MLP's weight dtype (uint8 here) unless this says otherwise
        self.int8_original_dtype = dtype

    @staticmethod
    def group_for(linear: nn.Linear, group_size: int) -> int | None:
        """The group size ``linear`` gets: ``group_size``, or when its input width is not a multiple, the largest
        even divisor of that width below it (MobileNet's 1x1 convolutions read 16, 24, 144 channels); None when
        that would be under 8 values per group (the layer stays int8)."""
        width = linear.in_features
        size = next((d for d in range(min(group_size, width), 7, -1) if width % d == 0 and d % 2 == 0), None)
        return size

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        """An empty 4-bit copy of ``linear``'s shape (filled by a state dict at load time)."""
        return cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                   linear.weight.dtype).to(linear.weight.device)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> "Int4Linear":
        """``linear`` stored as ``codes`` (out, in) 0..15 with ``scale`` / ``zero`` (out, in / group_size)."""
        new = cls.like(linear, group_size)
        device = linear.weight.device
        new.weight.data = pack4(codes.to(torch.uint8)).to(device)
        new.scale, new.zero = scale.to(torch.float16).to(device), zero.to(torch.uint8).to(device)
        if linear.bias is not None:
            new.bias.data = linear.bias.detach().clone()
        return new

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, 4-bit groups of {self.group_size}"

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes = unpack4(self.weight).to(torch.float32)
        groups = codes.reshape(self.out_features, -1, self.group_size)
        w = (groups - self.zero.to(torch.float32).unsqueeze(-1)) * self.scale.to(torch.float32).unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features).to(dtype or self.int8_original_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)
