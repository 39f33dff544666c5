"""timm backbones (ResNet, EfficientNet, ConvNeXt, ViT, ... any ``timm.create_model`` name) with local weights.

Preprocessing comes from the model's ``pretrained_cfg`` (input size, mean, std, interpolation), as timm's own
transforms read it. The classifier is whatever ``get_classifier()`` returns: its size is read from the weights
(a fine-tuned head), and ``strip: {features: true}`` rebuilds with ``num_classes=0``, timm's own way to a
headless backbone, so the output reloads as timm builds it.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmopt.adapters.image_only import ImageOnlyAdapter
from mmopt.adapters.structure import check_patch_multiple, install_swapped
from mmopt.core import Model, ModelSpec, PruneLayout, QuantLayout
from mmopt.errors import ModelSpecError, UnsupportedError, UserError
from mmopt.weights import load_weights_file, save_parts, uninitialised, weight_shapes

if TYPE_CHECKING:
    import torch
    from torch import nn

PART = "visual"


class TimmAdapter(ImageOnlyAdapter):
    family: ClassVar[str] = "timm"
    source: ClassVar[str] = "timm"

    # --- loading and saving --------------------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> Model:
        shapes = weight_shapes(spec.weights) if spec.weights else None
        with uninitialised(skip=bool(spec.weights)):      # the weights file overwrites every parameter
            model = self.build({"name": spec.name, "kwargs": _kwargs(spec, shapes)}, {}, {})
        if spec.weights:
            load_weights_file(model.module, spec.weights, f"weights {Path(spec.weights).name}")
        model.random_weights = not spec.weights
        return model

    def load_empty(self, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> Model:
        import torch

        kwargs = _kwargs(spec, {k: torch.empty(v, device="meta") for k, v in shapes.items()})
        with torch.device("meta"):
            return self.build({"name": spec.name, "kwargs": kwargs}, {}, {})

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        timm = _timm()
        name = arch["name"]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ModelSpecError(f"unknown timm model {name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
        try:
            module = timm.create_model(name, pretrained=False, **arch.get("kwargs", {}))
        except TypeError as exc:     # a keyword the model does not take
            raise ModelSpecError(f"timm {name}: {exc}", hint="see the model's keyword arguments") from None
        cfg = module.pretrained_cfg
        _, height, _ = cfg.get("input_size", (3, 224, 224))
        size = arch.get("kwargs", {}).get("img_size", height)
        kept = {k: v for k, v in info.items() if k not in ("part_prefixes", "outputs")}
        return Model(module=module.eval(), source=self.source, arch=dict(arch), parts=[PART],
                     preprocess={"image_size": size, "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                                 "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
                                 "interpolation": cfg.get("interpolation", "bicubic"), **preprocess},
                     info={"part_prefixes": {PART: [""]},
                           "outputs": "logits" if module.num_classes else "features", **kept})

    def save(self, model: Model, out: Path) -> dict[str, str]:
        return save_parts(model, out)

    # --- structure -----------------------------------------------------------------------------------------

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        """With ``features`` the classifier goes (timm's ``reset_classifier(0)``): the output is the pooled
        feature vector, and the output rebuilds with ``num_classes=0``."""
        if not features or not model.module.num_classes:
            return []
        name = model.module.pretrained_cfg.get("classifier", "head")
        model.module.reset_classifier(0)
        model.arch = {**model.arch, "kwargs": {**model.arch.get("kwargs", {}), "num_classes": 0}}
        model.info["outputs"] = "features"
        return [name]

    def quantization_layout(self, model: Model) -> QuantLayout:
        """timm's attention is a fused ``qkv`` Linear and its MLPs are Linear layers: plain swaps cover them."""
        return QuantLayout(structural=True)

    def prune_layout(self, model: Model, part: str) -> PruneLayout:
        """CNNs: channels through Torch-Pruning's dependency graph, the classifier keeping its outputs. ViTs: the
        MLP width of each block (fc1 -> fc2); their embedding width would need timm's attention to learn a new
        head_dim, which Torch-Pruning does not tell it."""
        model.check_part(part)
        if _patch_size(model.module):
            blocks = getattr(model.module, "blocks", [])
            ffn = [(f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2") for i, b in enumerate(blocks)
                   if hasattr(getattr(b, "mlp", None), "fc1")]
            return PruneLayout(targets=("mlp",) if ffn else (), ffn=ffn)
        head = model.module.get_classifier()
        ignore = [n for n, m in model.module.named_modules() if m is head and n]
        return PruneLayout(targets=("channels",), ignore=ignore)

    # --- training and what-if ------------------------------------------------------------------------------

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        model.check_part(part)
        try:
            model.module.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as exc:
            raise UnsupportedError(f"{model.arch['name']}: timm has no gradient checkpointing for it ({exc})") \
                from None
        return "timm set_grad_checkpointing"

    def at_image_size(self, model: Model, size: int) -> Model:
        if not _patch_size(model.module):
            return model          # convolutional with global pooling: any size runs
        arch = {**model.arch, "kwargs": {**model.arch.get("kwargs", {}), "img_size": size}}
        return self.build(arch, {**model.preprocess, "image_size": size}, model.info)

    # --- layer drop, resolution, swap --------------------------------------------------------------------

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """ViTs: timm's ``set_input_size`` interpolates the position embeddings; CNNs only change preprocessing."""
        model.check_part(part)
        if model.info.get("swapped"):
            raise UnsupportedError("resolution: this model's image part was swapped; change it before the swap")
        patch = _patch_size(model.module)
        if patch:
            check_patch_multiple(size, patch)
            model.module.set_input_size(img_size=(size, size))
            model.arch = {**model.arch, "kwargs": {**model.arch.get("kwargs", {}), "img_size": size}}
        elif size < 32:
            raise UserError(f"image_size {size} is too small for a CNN that downsamples 32x; use 32 or more")
        model.preprocess["image_size"] = size

    def swap_part(self, model: Model, part: str, module: nn.Module) -> None:
        model.check_part(part)
        install_swapped(model, part, module, [], True)


def _timm():
    import timm

    return timm


def _kwargs(spec: ModelSpec, shapes: dict[str, torch.Tensor] | None) -> dict:
    """The builder's keywords: the recipe's, and ``num_classes`` given or read from the weights' classifier."""
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    elif shapes is not None:
        kwargs.update(_head_size(spec.name, kwargs, shapes))
    return kwargs


def _head_size(name: str, kwargs: dict, shapes: dict[str, torch.Tensor]) -> dict:
    """``{"num_classes": n}`` when the weights' classifier (``pretrained_cfg["classifier"]``) has another number
    of outputs than the stock one, ``{"num_classes": 0}`` when the weights have none; else ``{}``."""
    import torch

    timm = _timm()
    if not timm.is_model(name):
        return {}           # build() names the closest models
    try:
        with torch.device("meta"):
            stock = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # a keyword the model does not take: build() says which
        return {}
    classifier = stock.pretrained_cfg.get("classifier")
    if not classifier or not stock.num_classes:
        return {}
    found = shapes.get(f"{classifier}.weight")
    if found is None:
        headless = not any(k.startswith(f"{classifier}.") for k in shapes)
        return {"num_classes": 0} if headless else {}
    if found.shape[0] != stock.num_classes:
        return {"num_classes": int(found.shape[0])}
    return {}


def _patch_size(module: nn.Module) -> int | None:
    """The patch size of a ViT-style model (position embeddings tied to the image size), None for a CNN."""
    embed = getattr(module, "patch_embed", None)
    if embed is None or getattr(module, "pos_embed", None) is None:
        return None
    size = getattr(embed, "patch_size", None)
    return size[0] if isinstance(size, (tuple, list)) else size
