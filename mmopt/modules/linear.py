"""Linear forms of other matrix multiplies, so bitsandbytes (which quantizes ``nn.Linear`` only) can store them.

Each is numerically equivalent to what it replaces (up to float rounding) and is checked by a test:
- ``PatchLinear``: a convolution whose kernel equals its stride (a ViT patch embedding) as a Linear over
  flattened patches, returning the convolution's (N, C, h, w) layout;
- ``MatmulLinear``: a bare projection matrix used as ``x @ P`` (CLIP's ``proj``, ``text_projection``).
"""
from __future__ import annotations

import torch
from torch import nn


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
    with conv.weight.device:        # built where the conv is (a model on the meta device stays without memory)
        new = PatchLinear(conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None)
    with torch.no_grad():
        new.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
        if conv.bias is not None:
            new.linear.bias.copy_(conv.bias)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


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
    with matrix.device:
        new = MatmulLinear(matrix.shape[0], matrix.shape[1])
    with torch.no_grad():
        new.linear.weight.copy_(matrix.detach().T)
    return new.to(device=matrix.device, dtype=matrix.dtype)
