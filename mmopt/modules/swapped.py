"""The module that stands in for a swapped part: another model's part plus an optional linear projection.

It is rebuilt at load time from a JSON record (the student's family, architecture, preprocessing and the
projection's shape), so a checkpoint with a swapped part loads through ``mmopt.load`` without pickling.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmopt.core import Model, is_image_part

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter


class SwappedPart(nn.Module):
    """inputs of the original part -> student part's output -> projection to the original output width."""

    def __init__(self, student: Model, adapter: Adapter, part: str, projection: tuple[int, int] | None):
        super().__init__()
        self.student = student.module
        self.proj = nn.Linear(*projection) if projection else None
        if projection:
            # Fixed scales put the projection's input and output near unit RMS whatever the two models' output
            # magnitudes (random-weight towers are far from unit scale), so its least-squares weights have the
            # scale of ordinary weights and the optimizer's first steps, which move every weight by about ``lr``,
            # do not wipe it out.
            self.register_buffer("in_scale", torch.ones(()))
            self.register_buffer("out_scale", torch.ones(()))
        # Plain attributes (not submodules): the student Model shares ``self.student`` as its module.
        self._student_model = student
        self._student_adapter = adapter
        self._student_part = part
        self._image_size = student.preprocess.get("image_size") if is_image_part(part) else None

    def features(self, *inputs: Any) -> torch.Tensor:
        """The student part's own output, before the projection. Images come preprocessed for the original
        part; a student built for another input size (a ViT's positional grid is fixed) gets them resized."""
        size = self._image_size
        if size and inputs[0].dim() == 4 and tuple(inputs[0].shape[-2:]) != (size, size):
            pixels = torch.nn.functional.interpolate(inputs[0].float(), size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)
            inputs = (pixels.to(inputs[0].dtype),) + tuple(inputs[1:])
        return self._student_adapter.run(self._student_model, self._student_part, inputs)

    def forward(self, *inputs: Any) -> torch.Tensor:
        out = self.features(*inputs)
        if self.proj is None:
            return out
        return self.proj(out.to(self.proj.weight.dtype) * self.in_scale) * self.out_scale

    def fit_projection(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Set scales and the least-squares projection from calibration ``features`` -> ``targets``; return the
        fitted outputs."""
        in_scale = 1 / features.float().pow(2).mean().sqrt().clamp(min=1e-12)
        out_scale = targets.float().pow(2).mean().sqrt().clamp(min=1e-12)
        weight, bias = least_squares(features * in_scale, targets / out_scale)
        with torch.no_grad():
            self.in_scale.fill_(in_scale)
            self.out_scale.fill_(out_scale)
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)
        return ((features * in_scale) @ weight.T + bias) * out_scale


def build_student(record: dict) -> tuple[Model, Adapter]:
    """(student Model, its adapter) from a swap record: architecture rebuilt, other parts and heads dropped."""
    from mmopt import registry

    adapter = registry.adapter_for(record["source"])
    student = adapter.build(record["arch"], record["preprocess"], record["info"])
    for other in [p for p in list(student.parts) if p != record["part"]]:
        adapter.drop_part(student, other)
    if record.get("features"):
        adapter.drop_unused_heads(student, features=True)
    return student, adapter


def student_record(student: Model, part: str) -> dict:
    """What ``build_student`` needs, JSON-able."""
    return {"source": student.source, "arch": student.arch, "preprocess": student.preprocess, "part": part,
            "info": student.saved_info(), "features": True}


def least_squares(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the linear map features -> targets with the least squared error (ridge-regularised,
    since there may be fewer calibration samples than feature dimensions)."""
    x = features.double()
    y = targets.double()
    x_mean, y_mean = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * (gram.diagonal().mean() + 1e-12)
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc).T
    bias = (y_mean - x_mean @ weight.T).squeeze(0)
    return weight.float(), bias.float()
