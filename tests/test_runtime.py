"""mmopt.runtime on CPU: block offload hooks, batch back-off on OOM, frame windows."""
from __future__ import annotations

import pytest
import torch

from mmopt import runtime
from mmopt.memory import estimator
from mmopt.errors import UserError


def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(width=32, layers=2, patch_size=8, image_size=32,
                                                              head_width=16),
                                text_cfg=dict(width=32, layers=2, heads=2, vocab_size=64,
                                              context_length=16)).eval()


def test_offload_keeps_outputs_and_moves_whole_blocks():
    module = tiny_clip()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = module.encode_image(images), module.encode_text(tokens)
    blocks = estimator.offload_blocks(module)
    assert "visual.transformer.resblocks.0" in blocks and "transformer.resblocks.1" in blocks
    assert "visual.proj" not in blocks          # a bare parameter of the tower stays resident
    runtime.offload(module, "cpu")
    block = module.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.device.type == "meta"    # held by the hook's CPU copy between runs
    with torch.no_grad():
        after = module.encode_image(images), module.encode_text(tokens)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert block.mlp.c_fc.weight.device.type == "meta"


def test_auto_batch_size_backs_off_on_cuda_oom():
    tried = []

    def work(batch_size):
        tried.append(batch_size)
        if batch_size > 50:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_size * 2

    result, used = runtime.auto_batch_size(work, start=100)
    assert used <= 50 and result == used * 2 and tried[0] == 100 and tried == sorted(tried, reverse=True)
    with pytest.raises(UserError):
        runtime.auto_batch_size(work, start=0)


def test_encode_frames_matches_one_batch(tmp_path):
    from mmopt.core import Model
    from mmopt.adapters.open_clip import CLIP_TEXT

    module = tiny_clip()
    module.mmopt_model = Model(module=module, source="open_clip", arch={}, parts=["visual", "text"],
                               preprocess={"image_size": 32},
                               info={"part_prefixes": {"visual": ["visual."], "text": list(CLIP_TEXT)}})
    frames = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        whole = module.encode_image(frames)
    windowed = runtime.encode_frames(module, frames, window=3)
    streamed = runtime.encode_frames(module, iter([frames[0], frames[1:5], frames[5], frames[6]]), window=3)
    assert windowed.shape == (7, 32)
    assert torch.allclose(windowed, whole, atol=1e-5) and torch.allclose(streamed, whole, atol=1e-5)
    with pytest.raises(UserError, match="window must be at least 1"):
        runtime.encode_frames(module, frames, window=0)
    with pytest.raises(UserError, match="mmopt.load"):
        runtime.encode_frames(torch.nn.Linear(2, 2), frames, window=2)
