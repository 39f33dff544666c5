"""Byte counting on modules small enough to add up by hand, and the peak-activation estimator."""
from __future__ import annotations

import torch
from torch import nn

from mmopt.memory import counting, tracing


def test_tensor_and_unique_bytes_by_hand():
    lin = nn.Linear(3, 4)                              # 12 weights + 4 biases, fp32
    assert sum(counting.tensor_bytes(p) for p in lin.parameters()) == 64
    w = torch.zeros(10, 10)
    assert counting.unique_bytes([w, w.t(), w[0]]) == 400   # views share one storage
    assert counting.unique_bytes([w.half()]) == 200


def test_fake_trace_counts_intermediates_exactly():
    # x (4x8 fp32) -> Linear(8, 16): output 4x16x4 B = 256 B; relu: another 256 B while both are alive.
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    x = torch.randn(4, 8)
    peak = tracing.trace_forward(lambda m, t: m(t), net, (x,)).peak_bytes
    assert peak == 512


def test_fake_and_real_traces_agree_on_a_conv_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    fake = tracing.trace_forward(lambda m, t: m(t), net, (x,)).peak_bytes
    real = tracing.trace_real(lambda m, t: m(t), net, (x,))
    assert fake == real > 2 * 8 * 16 * 16 * 4


def test_peak_activation_says_it_is_an_estimate_on_cpu():
    net = nn.Linear(8, 8)
    peak = tracing.peak_activation(lambda m, t: m(t), net, (torch.randn(2, 8),))
    assert peak.method == tracing.ESTIMATED and peak.peak_bytes == 2 * 8 * 4


def test_logical_numel_of_plain_tensor():
    assert counting.logical_numel(torch.zeros(3, 5)) == 15


def test_units_round_trip():
    from mmopt.units import format_bytes, parse_bytes

    assert parse_bytes("200MiB") == 200 * 2**20
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes(1024) == 1024
    assert format_bytes(56.2 * 2**20) == "56.2 MiB"
