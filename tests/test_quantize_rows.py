"""Per-row int8 is computed a block of rows at a time (bounded temporaries) with the same result as all at once."""
from __future__ import annotations

import torch

from mmopt.modules import embedding


def test_blocks_of_rows_give_the_same_int8_rows_as_one_block(monkeypatch):
    weight = torch.randn(1000, 48, dtype=torch.float16) * 3
    blocked = embedding.quantize_rows(weight)
    monkeypatch.setattr(embedding, "QUANTIZE_BLOCK_ELEMENTS", 10**9)
    whole = embedding.quantize_rows(weight)
    monkeypatch.setattr(embedding, "QUANTIZE_BLOCK_ELEMENTS", 7)      # fewer than a row: one row per block
    tiny = embedding.quantize_rows(weight)
    for q, scale in (blocked, tiny):
        assert torch.equal(q, whole[0]) and torch.equal(scale, whole[1])
    assert whole[0].dtype == torch.int8 and whole[1].dtype == torch.float16 and whole[1].shape == (1000, 1)
    assert torch.allclose(whole[0].float() * whole[1].float(), weight.float(), atol=float(whole[1].max()))
