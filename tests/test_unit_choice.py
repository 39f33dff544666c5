"""Which FFN units a pruned block keeps (``importance: reconstruction``): OBS elimination on the units' second
moments (the pass keeping exactly the units it ranks highest: tests/passes/test_prune.py)."""
from __future__ import annotations

import pytest
import torch

from mmopt.distill.unit_choice import eliminate, hidden_moments


def _moments(x: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    return rows.T @ rows / len(rows)


def test_a_unit_whose_signal_another_carries_goes_first_not_the_smallest():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4000, 1, generator=gen) for _ in range(3))
    # units 0 and 1 carry the same signal; unit 2 carries its own, with the smallest weights (magnitude drops it)
    x = torch.cat([a, a + 0.01 * c, 0.5 * b, c], dim=1)
    weight = torch.tensor([[1.0, 1.0, 0.4, 2.0], [0.5, 0.5, -0.4, 1.0]])
    scores = eliminate(weight, _moments(x), count=1)
    assert int(scores.argmin()) in (0, 1) and sorted(scores.tolist()) == [0, 1, 2, 3]
    # exact greedy (a step of 1): one of the pair, then the small unit; the other of the pair stays
    removed = set(torch.nonzero(eliminate(weight, _moments(x), count=2, step=1) < 2).flatten().tolist())
    assert len(removed & {0, 1}) == 1 and 2 in removed
    # units of one step are chosen by the costs at its start: both of the pair go together (the documented cost)
    together = set(torch.nonzero(eliminate(weight, _moments(x), count=2, step=2) < 2).flatten().tolist())
    assert together == {0, 1}


def test_scores_order_the_removed_units_below_every_kept_one():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 32, generator=gen) @ torch.randn(32, 32, generator=gen)
    scores = eliminate(torch.randn(8, 32, generator=gen), _moments(x.relu()), count=10, step=4)
    assert sorted(scores.tolist()) == list(range(32))            # distinct: ties would let Torch-Pruning guess


def test_moments_count_real_tokens_only():
    linear = torch.nn.Linear(3, 2)

    class Model:
        module = torch.nn.Sequential(linear)

    x = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    moments = hidden_moments(Model(), ["0"], [(x, mask)], lambda m, inputs: m.module(inputs[0]))["0"]
    expected = _moments(x[0, :2])
    torch.testing.assert_close(moments, expected)
