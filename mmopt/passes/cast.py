"""Store and run parts in float16 or bfloat16."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmopt.passes.base import Change, Context, PassConfig, PassResult, describe, target_parts


class Config(PassConfig):
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="the floating dtype to store and run in")
    parts: list[str] | None = Field(None, description="parts to cast (default: all)")


def apply(model, cfg: Config, ctx: Context) -> PassResult:
    result = PassResult()
    for part in target_parts(model, cfg.parts):
        for name, before, after in _cast(model, part, cfg.dtype):
            result.changed.append(Change(name, before, after))
    result.record = {"parts": target_parts(model, cfg.parts)}
    return result


def restore(model, cfg: Config, record: dict, adapter) -> None:
    for part in record["parts"]:
        if part in model.parts:
            list(_cast(model, part, cfg.dtype))


def _cast(model, part: str, dtype_name: str):
    """Cast every floating parameter and buffer of ``part`` in place; yield (name, before, after) descriptions."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, tensor in list(model.named_tensors(part)):
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        before = describe(tensor)
        tensor.data = tensor.data.to(dtype)
        yield name, before, describe(tensor)
