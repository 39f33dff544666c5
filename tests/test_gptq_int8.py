"""GPTQ for int8 rows: the storage of round-to-nearest, better codes; convolutions through their im2col patches."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmopt.modules.embedding import quantize_rows
from mmopt.quant import gptq


def _smooth_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Images whose neighbouring pixels are correlated (upsampled noise), as a convolution's real inputs are."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, size // 4, size // 4, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + 3.0


def _output_error(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = module(x)
        original = module.weight.data.clone()
        module.weight.data = weight.reshape(original.shape).to(original.dtype)
        error = float((module(x) - reference).pow(2).mean())
        module.weight.data = original
    return error


def test_conv_hessians_are_the_second_moment_of_each_groups_patches():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9)
    for conv in (nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                 nn.Conv2d(4, 8, 3)):
        stat = gptq.collect({"c": conv}, lambda batch: conv(batch[0]), [(x[:2],), (x[2:],)])
        cols = F.unfold(x, 3, padding=conv.padding, stride=conv.stride)               # (N, C * 9, L)
        per_group = cols.reshape(3, conv.groups, -1, cols.shape[-1]).permute(1, 0, 3, 2).flatten(1, 2)
        expected = per_group.transpose(1, 2) @ per_group / per_group.shape[1]
        torch.testing.assert_close(stat.of("c"), expected, rtol=1e-4, atol=1e-5)


def test_gptq_int8_keeps_the_rows_scale_and_lowers_a_linear_output_error():
    torch.manual_seed(0)
    linear = nn.Linear(96, 32)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(512, 96, generator=gen) @ torch.randn(96, 96, generator=gen)) * torch.logspace(-1, 1, 96)
    q = gptq.gptq_int8(linear.weight, x.T @ x / len(x))
    rtn_codes, rtn_scale = quantize_rows(linear.weight)
    assert q.codes.dtype == torch.int8 and int(q.codes.abs().max()) <= 127
    torch.testing.assert_close(q.scale, rtn_scale)                 # the same storage: only the codes differ
    approx = q.codes.float() * q.scale
    errors = {name: _output_error(linear, w, x) for name, w in (("gptq", approx),
                                                                ("rtn", rtn_codes.float() * rtn_scale))}
    assert errors["gptq"] < 0.7 * errors["rtn"]
    assert q.rel_error > 0


@pytest.mark.parametrize("in_channels, out_channels, groups, size, seed, bound", [
    (16, 16, 16, 24, 2, 0.5),       # depthwise: one 9x9 Hessian per channel
    (8, 6, 2, 16, 3, 1.0),          # grouped: each group's filters see only their own inputs
])
def test_gptq_int8_on_a_convolution_beats_round_to_nearest(in_channels, out_channels, groups, size, seed, bound):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups, bias=False)
    x = _smooth_images(6, in_channels, size, seed=seed)
    stat = gptq.collect({"c": conv}, lambda batch: conv(batch[0]), [(x,)])
    n = in_channels // groups * 9
    assert stat.of("c").shape == (groups, n, n)
    q = gptq.gptq_int8(conv.weight, stat.of("c"))
    assert q.codes.shape == conv.weight.shape
    rtn_codes, rtn_scale = quantize_rows(conv.weight.reshape(out_channels, -1))
    gptq_error = _output_error(conv, q.codes.reshape(out_channels, -1).float() * q.scale, x)
    assert gptq_error < bound * _output_error(conv, rtn_codes.float() * rtn_scale, x)


def test_convolutions_gptq_cannot_unfold_are_left_to_round_to_nearest():
    assert gptq.covers(nn.Linear(4, 4)) and gptq.covers(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not gptq.covers(nn.Conv2d(4, 4, 3, padding="same"))                # F.unfold takes numbers
    assert not gptq.covers(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not gptq.covers(nn.Conv1d(4, 4, 3))
