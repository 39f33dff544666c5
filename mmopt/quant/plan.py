"""Which Linear layers of a part get 4 bits, computed how, and which stay int8 under a size budget (``method: int4``).

- ``four_bit_codes``: every Linear layer's 4-bit groups, by GPTQ on the part's calibration inputs or by
  round-to-nearest; ``algorithm: auto`` is GPTQ when those inputs are real (texts, the bundled sample texts, or
  images) and round-to-nearest when they would be synthetic (fitting a layer to noise inputs is no calibration).
- ``int8_within``: with ``max_size``, the layers whose 4-bit codes cost the most output error per byte saved
  (GPTQ's own error on the calibration inputs, ``Quantized4.rel_error``) go back to int8 rows while the part's
  bytes stay within the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmopt.errors import DataError

if TYPE_CHECKING:
    from torch import nn

    from mmopt.core import Model
    from mmopt.passes.base import Context
    from mmopt.quant.gptq import Quantized4

SEQ_LEN = 128       # calibration texts are cut at this many tokens, as fidelity's are


@dataclass
class FourBit:
    """The 4-bit codes of a part's Linear layers and how they were made (for the pass's metrics)."""

    codes: dict[str, Quantized4] = field(default_factory=dict)
    algorithm: str = "rtn"
    inputs: str = ""                  # the calibration inputs GPTQ saw ("" for round-to-nearest)


def four_bit_codes(model: Model, part: str, linears: dict[str, nn.Module], algorithm: str, group_size: int,
                   ctx: Context) -> FourBit:
    """4-bit groups of ``group_size`` (or the layer's ``Int4Linear.group_for``) for every module of ``linears``
    (name -> ``nn.Linear``)."""
    from mmopt.calibration import describe_inputs, inputs_for
    from mmopt.modules.quantized import Int4Linear
    from mmopt.quant import gptq

    description, synthetic = describe_inputs(model, ctx.adapter, part, ctx.calibration)
    if algorithm == "gptq":
        require_real_inputs(model, part, ctx, "algorithm gptq")
    use_gptq = algorithm == "gptq" or (algorithm == "auto" and not synthetic)
    hessians = None
    if use_gptq:
        batches = inputs_for(model, ctx.adapter, part, ctx.calibration, SEQ_LEN, ctx.seed)
        hessians = gptq.collect(linears, lambda batch: ctx.adapter.run(model, part, batch), batches)
    out = FourBit(algorithm="gptq" if use_gptq else "rtn", inputs=description if use_gptq else "")
    for name, linear in linears.items():
        weight, size = linear.weight.detach(), Int4Linear.group_for(linear, group_size)
        h = hessians.of(name) if hessians is not None else None
        # a layer no calibration input reached (a head the part's forward skips) is rounded to nearest
        out.codes[name] = gptq.gptq(weight, h, size) if h is not None else gptq.round_to_nearest(weight, size)
    return out


def require_real_inputs(model: Model, part: str, ctx: Context, option: str) -> str:
    """The description of ``part``'s calibration inputs; refused when they would be synthetic (fitting codes or
    biases to noise is no calibration)."""
    from mmopt.calibration import describe_inputs

    description, synthetic = describe_inputs(model, ctx.adapter, part, ctx.calibration)
    if synthetic:
        raise DataError(f"quantize: {option} on part {part!r} needs calibration data, got {description}",
                        hint="add calibration: {texts: ...} or {images: ...} to the recipe"
                             + (", or use algorithm rtn" if "gptq" in option else ""))
    return description


def int8_within(candidates: dict[str, tuple[float, int]], spare_bytes: int) -> list[str]:
    """Names to keep int8, from ``candidates`` (name -> (4-bit relative output error, extra bytes as int8)),
    most error per extra byte first, while their extra bytes fit in ``spare_bytes``; a layer that does not fit is
    passed over for smaller ones."""
    chosen = []
    ranked = sorted(candidates.items(), key=lambda item: (-item[1][0] / max(1, item[1][1]), item[0]))
    for name, (_, extra) in ranked:
        if extra <= spare_bytes:
            chosen.append(name)
            spare_bytes -= extra
    return chosen
