"""Store and run parts in float16 or bfloat16."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Literal

from pydantic import Field

from mmopt.errors import UnsupportedError
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult, describe, target_parts

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.core import Model


class CastConfig(PassConfig):
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="the floating dtype to store and run in")
    parts: list[str] | None = Field(None, description="parts to cast (default: all)")


class Cast(Pass):
    name = "cast"
    Config = CastConfig

    def check(self, model: Model, ctx: Context) -> None:
        """A part an earlier quantize changed cannot be cast: quantized weights fix the dtype they compute in when
        they are made (torchao's Int8Tensor, bitsandbytes). Other parts can (an int8 text tower, a float16 image
        tower)."""
        ours = set(target_parts(model, self.config.parts))
        for earlier in ctx.history:
            if earlier.name == "quantize":
                both = sorted(ours & set(target_parts(model, earlier.config.parts)))
                if both:
                    raise UnsupportedError(f"cast: part {both[0]!r} is already quantized; its quantized weights keep "
                                           "their dtype", hint="put cast before quantize in the recipe, or cast "
                                                               "other parts")

    def apply(self, model: Model, ctx: Context) -> PassResult:
        self.check(model, ctx)
        result = PassResult()
        parts = target_parts(model, self.config.parts)
        for part in parts:
            for name, before, after in _cast(model, part, self.config.dtype):
                result.changed.append(Change(name, before, after))
        result.record = {"parts": parts}
        return result

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        for part in record["parts"]:
            if part in model.parts:
                list(_cast(model, part, self.config.dtype))


def _cast(model: Model, part: str, dtype_name: str) -> Iterator[tuple[str, str, str]]:
    """Cast every floating parameter and buffer of ``part`` in place; yield (name, before, after) descriptions."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, tensor in list(model.named_tensors(part)):
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        before = describe(tensor)
        tensor.data = tensor.data.to(dtype)
        yield name, before, describe(tensor)
