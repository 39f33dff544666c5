"""Run image parts at another input resolution.

ViT towers (open_clip, Hugging Face CLIP, torchvision ViT) get their positional embeddings resampled to the new
patch grid (bicubic, class token kept); CNNs pool globally, so only the preprocessing changes. The rebuild
config and the preprocessing are rewritten, so ``mmopt.load`` and ``mmopt profile OUT`` use the new size, and
fidelity compares the new model at its size with the original at its own, on the same images.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from mmopt.core import is_image_part
from mmopt.errors import UnsupportedError
from mmopt.passes.base import Change, Context, PassConfig, PassResult, Skip


class Config(PassConfig):
    image_size: int = Field(gt=0, description="the new input side in pixels (a multiple of the patch size for ViTs)")
    part: str = Field("visual", description="the image part to resize")


def apply(model: Any, cfg: Config, ctx: Context) -> PassResult:
    model.check_part(cfg.part)
    if not is_image_part(cfg.part):
        raise UnsupportedError(f"resolution: part {cfg.part!r} takes no images")
    before = int(model.preprocess["image_size"])
    result = PassResult()
    if before == cfg.image_size:
        ctx.adapter.set_image_size(model, cfg.part, cfg.image_size)   # still validates the size
        result.skipped.append(Skip(cfg.part, f"already {before} px"))
        result.record = {"part": cfg.part, "before": before, "after": before}
        return result
    ctx.adapter.set_image_size(model, cfg.part, cfg.image_size)
    result.changed.append(Change(f"{cfg.part} input", f"{before}x{before}", f"{cfg.image_size}x{cfg.image_size}"))
    result.record = {"part": cfg.part, "before": before, "after": cfg.image_size}
    result.metrics[cfg.part] = {"image_size": {"before": before, "after": cfg.image_size}}
    return result

