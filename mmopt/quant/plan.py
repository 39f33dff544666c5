"""How a part's layers are coded before they are stored: 4-bit groups or int8 rows, by GPTQ or round-to-nearest,
and which stay int8 under a size budget (``method: int4``).

- ``plan_codes``: the codes GPTQ chooses for a part's Linear layers and convolutions on its calibration inputs
  (``algorithm: gptq``, or ``auto`` for ``method: int4`` when those inputs are real: texts, the bundled sample
  texts, or images; fitting a layer to synthetic inputs is no calibration), 4-bit for the Linear layers that
  ``method: int4`` asks for and int8 rows for the rest; without GPTQ, 4-bit codes by round-to-nearest and no int8
  codes (the pass rounds those itself).
- ``int8_within``: with ``max_size``, the layers whose 4-bit codes cost the most output error per byte saved go
  back to int8 rows while the part's bytes stay within the budget. The error is the *part's* output error on the
  calibration inputs with that layer alone in 4 bits (``part_output_errors``; one forward pass per layer), since a
  layer's own output error says little about what reaches the output (MobileNetV2, 15 development images: at the
  same bytes, logit cosine 0.9911 by the part's error against 0.9864 by the layer's); without calibration data,
  round-to-nearest's weight error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmopt.errors import DataError

if TYPE_CHECKING:
    from torch import nn

    from mmopt.core import Model
    from mmopt.passes.base import Context
    from mmopt.quant.gptq import Hessians, Quantized4, Quantized8

SEQ_LEN = 128       # calibration texts are cut at this many tokens, as fidelity's are
RANKING_SAMPLES = 64    # calibration samples the part's output errors are measured on: a ranking, not a score


@dataclass
class Codes:
    """A part's codes and how they were made (for the pass's metrics): 4-bit groups (``four``) and int8 rows
    (``eight``, GPTQ only) by module name."""

    four: dict[str, Quantized4] = field(default_factory=dict)
    eight: dict[str, Quantized8] = field(default_factory=dict)
    algorithm: str = "rtn"
    inputs: str = ""                  # the calibration inputs GPTQ saw ("" for round-to-nearest)
    hessians: Hessians | None = None
    int8_group_size: int | None = None    # int8 scales per this many values of a row (int8_group_for), or per row

    def int8(self, name: str, module: nn.Module) -> Quantized8 | None:
        """GPTQ's int8 rows for ``module`` (computed on first use: a layer taken back from 4 bits), or None
        without GPTQ or when no calibration input reached it."""
        from mmopt.modules.quantized import int8_group_for
        from mmopt.quant import gptq

        if name not in self.eight and self.hessians is not None and self.hessians.of(name) is not None:
            group_size = int8_group_for(module.weight[0].numel(), self.int8_group_size)
            self.eight[name] = gptq.gptq_int8(module.weight, self.hessians.of(name), group_size=group_size)
        return self.eight.get(name)


def uses_gptq(model: Model, part: str, method: str, algorithm: str, ctx: Context) -> bool:
    """Whether ``part``'s codes come from GPTQ: asked for (real calibration inputs required), or ``auto`` for
    ``method: int4`` on real inputs."""
    from mmopt.calibration import describe_inputs

    if algorithm == "gptq":
        require_real_inputs(model, part, ctx, "algorithm gptq")
        return True
    return algorithm == "auto" and method == "int4" and not describe_inputs(model, ctx.adapter, part,
                                                                           ctx.calibration)[1]


def plan_codes(model: Model, part: str, four_bit: dict[str, nn.Module], int8: dict[str, nn.Module], gptq_on: bool,
               group_size: int, ctx: Context, int8_group_size: int | None = None) -> Codes:
    """4-bit groups of ``group_size`` (or the layer's ``Int4Linear.group_for``) for every Linear of ``four_bit``
    and, with ``gptq_on``, int8 rows for every module of ``int8`` (Linear layers and convolutions GPTQ
    ``covers``; their scales per group of ``int8_group_size`` values where given), from one calibration pass of
    the float model."""
    from mmopt.calibration import describe_inputs, inputs_for
    from mmopt.modules.quantized import Int4Linear
    from mmopt.quant import gptq

    out = Codes(int8_group_size=int8_group_size)
    if gptq_on:
        batches = inputs_for(model, ctx.adapter, part, ctx.calibration, SEQ_LEN, ctx.seed)
        covered = {name: module for name, module in {**four_bit, **int8}.items() if gptq.covers(module)}
        out.hessians = gptq.collect(covered, lambda batch: ctx.adapter.run(model, part, batch), batches)
        out.algorithm, out.inputs = "gptq", describe_inputs(model, ctx.adapter, part, ctx.calibration)[0]
    for name, linear in four_bit.items():
        weight, size = linear.weight.detach(), Int4Linear.group_for(linear, group_size)
        h = out.hessians.of(name) if out.hessians is not None else None
        # a layer no calibration input reached (a head the part's forward skips) is rounded to nearest
        out.four[name] = gptq.gptq(weight, h, size) if h is not None else gptq.round_to_nearest(weight, size)
    for name, module in int8.items():
        out.int8(name, module)
    return out


def part_output_errors(model: Model, part: str, codes: Codes, names: list[str], ctx: Context) -> dict[str, float]:
    """For each Linear of ``names``: ``|y_4 - y|^2 / |y|^2`` of the part's outputs on the first ``RANKING_SAMPLES``
    calibration inputs when that layer alone takes its 4-bit codes and every other layer is as it is now (float)."""
    import torch

    from mmopt.calibration import inputs_for

    batches, seen = [], 0
    for batch in inputs_for(model, ctx.adapter, part, ctx.calibration, SEQ_LEN, ctx.seed):
        batches.append(batch)
        seen += len(batch[0])
        if seen >= RANKING_SAMPLES:
            break
    errors = {}
    with torch.no_grad():
        reference = [ctx.adapter.run(model, part, batch).float() for batch in batches]
        energy = sum(float(y.pow(2).sum()) for y in reference)
        for name in names:
            weight = model.module.get_submodule(name).weight
            original = weight.data
            weight.data = codes.four[name].dequantize().to(device=original.device, dtype=original.dtype)
            try:
                error = sum(float((ctx.adapter.run(model, part, batch).float() - y).pow(2).sum())
                            for batch, y in zip(batches, reference))
            finally:
                weight.data = original
            errors[name] = error / max(energy, 1e-30)
    return errors


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
