"""Run image parts at another input resolution.

ViT towers (open_clip, Hugging Face CLIP, torchvision ViT) get their positional embeddings resampled to the new
patch grid (bicubic, class token kept); CNNs pool globally, so only the preprocessing changes. The rebuild
config and the preprocessing are rewritten, so ``mmopt.load`` and ``mmopt profile OUT`` use the new size, and
fidelity compares the new model at its size with the original at its own, on the same images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mmopt.core import is_image_part
from mmopt.errors import UnsupportedError
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult, Skip

if TYPE_CHECKING:
    from mmopt.core import Model


class ResolutionConfig(PassConfig):
    image_size: int = Field(gt=0, description="the new input side in pixels (a multiple of the patch size for ViTs)")
    part: str = Field("visual", description="the image part to resize")


class Resolution(Pass):
    name = "resolution"
    Config = ResolutionConfig

    def check(self, model: Model, ctx: Context) -> None:
        model.check_part(self.config.part)
        if not is_image_part(self.config.part):
            raise UnsupportedError(f"resolution: part {self.config.part!r} takes no images")

    def apply(self, model: Model, ctx: Context) -> PassResult:
        part, size = self.config.part, self.config.image_size
        model.check_part(part)
        if not is_image_part(part):
            raise UnsupportedError(f"resolution: part {part!r} takes no images")
        before = int(model.preprocess["image_size"])
        result = PassResult()
        ctx.adapter.set_image_size(model, part, size)      # validates the size even when it does not change
        result.record = {"part": part, "before": before, "after": size}
        if before == size:
            result.skipped.append(Skip(part, f"already {before} px"))
            return result
        result.changed.append(Change(f"{part} input", f"{before}x{before}", f"{size}x{size}"))
        result.metrics[part] = {"image_size": {"before": before, "after": size}}
        return result

    def brief(self, metrics: dict) -> str:
        size = metrics["image_size"]
        return f"input {size['before']} -> {size['after']} px"
