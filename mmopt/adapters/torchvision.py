"""torchvision classification models (resnet*, mobilenet_v2/v3, efficientnet, ...) with optional weights."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmopt.adapters.image_only import ImageOnlyAdapter
from mmopt.adapters.structure import check_patch_multiple, checkpoint_blocks, install_swapped, interpolate_positions
from mmopt.core import Model, ModelSpec, PruneLayout, QuantLayout
from mmopt.errors import ModelSpecError, UnsupportedError, UserError
from mmopt.weights import load_weights_file, save_parts, uninitialised, weight_shapes

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HEADS = ("fc", "classifier", "heads", "head")   # classifier attribute names across torchvision families


class TorchvisionAdapter(ImageOnlyAdapter):
    family: ClassVar[str] = "torchvision"
    source: ClassVar[str] = "torchvision"

    def load(self, spec: ModelSpec) -> Model:
        state = weight_shapes(spec.weights) if spec.weights else None
        kwargs = dict(spec.kwargs)
        if spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        elif state is not None:
            kwargs.update(head_size(spec.name, kwargs, state))
        with uninitialised(skip=bool(spec.weights)):      # the weights file overwrites every parameter
            model = self.build({"name": spec.name, "kwargs": kwargs}, {}, {})
        if state is not None:
            where = f"weights {Path(spec.weights).name}"
            check_head(model.module, state, where)
            load_weights_file(model.module, spec.weights, where)
        model.random_weights = not spec.weights
        return model

    def load_empty(self, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> Model:
        import torch

        kwargs = dict(spec.kwargs)
        if spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        else:
            kwargs.update(head_size(spec.name, kwargs, {k: torch.empty(v, device="meta") for k, v in shapes.items()}))
        with torch.device("meta"):
            return self.build({"name": spec.name, "kwargs": kwargs}, {}, {})

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        import torchvision

        name = arch["name"]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ModelSpecError(f"unknown torchvision classification model {name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()")
        try:
            module = torchvision.models.get_model(name, weights=None, **arch.get("kwargs", {}))
        except TypeError as exc:     # a keyword the builder does not take
            raise ModelSpecError(f"torchvision {name}: {exc}", hint="see the builder's keyword arguments") from None
        kept = {k: v for k, v in info.items() if k != "part_prefixes"}
        return Model(module=module.eval(), source=self.source, arch=dict(arch), parts=["visual"],
                     preprocess={"image_size": 224, **IMAGENET, **preprocess},
                     info={"part_prefixes": {"visual": [""]}, "outputs": "logits", **kept})

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        """With ``features`` the classifier goes and the output is the pooled feature vector."""
        import torch.nn as nn

        if not features:
            return []
        name = head_name(model.module)
        if name is None:
            return []
        setattr(model.module, name, nn.Identity())
        model.info["outputs"] = "features"
        return [name]

    def prune_layout(self, model: Model, part: str) -> PruneLayout:
        """Conv nets: channels of every conv (Torch-Pruning follows residual couplings); the classifier stays."""
        import torch.nn as nn

        model.check_part(part)
        heads = [n for n in HEADS if isinstance(getattr(model.module, n, None), nn.Module)]
        return PruneLayout(targets=("channels",), ignore=heads)

    def save(self, model: Model, out: Path) -> dict[str, str]:
        return save_parts(model, out)

    def quantization_layout(self, model: Model) -> QuantLayout:
        """torchvision ViTs use nn.MultiheadAttention and a patch conv; their class/position tokens are 3-D
        parameters, left as they are."""
        return QuantLayout(structural=True)

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        model.check_part(part)
        count = checkpoint_blocks(model.module)
        if not count:
            raise UnsupportedError(f"{model.arch['name']}: no block structure to checkpoint")
        return f"torch.utils.checkpoint over {count} blocks"

    def at_image_size(self, model: Model, size: int) -> Model:
        return model  # convolutional with adaptive pooling: any image size runs

    # --- layer drop, resolution, swap --------------------------------------------------------------------

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """CNNs pool globally, so only the preprocessing changes; torchvision ViTs get interpolated positions."""
        import torch.nn as nn

        model.check_part(part)
        if model.info.get("swapped"):
            raise UnsupportedError("resolution: this model's image part was swapped; change it before the swap")
        module = model.module
        encoder = getattr(module, "encoder", None)
        if isinstance(getattr(encoder, "pos_embedding", None), nn.Parameter):   # torchvision VisionTransformer
            check_patch_multiple(size, module.patch_size)
            grid, new_grid = module.image_size // module.patch_size, size // module.patch_size
            pos = encoder.pos_embedding.data[0]
            encoder.pos_embedding = nn.Parameter(interpolate_positions(pos, grid, new_grid)[None])
            module.image_size = size
            model.arch = {**model.arch, "kwargs": {**model.arch.get("kwargs", {}), "image_size": size}}
        elif size < 32:
            raise UserError(f"image_size {size} is too small for a CNN that downsamples 32x; use 32 or more")
        model.preprocess["image_size"] = size

    def swap_part(self, model: Model, part: str, module: nn.Module) -> None:
        model.check_part(part)
        install_swapped(model, part, module, [], True)


def head_name(module: nn.Module) -> str | None:
    """The attribute holding the classifier head (``fc``, ``classifier``, ...), None when there is none."""
    import torch.nn as nn

    for name in HEADS:
        head = getattr(module, name, None)
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return name
    return None


def head_size(name: str, kwargs: dict, state: dict[str, torch.Tensor]) -> dict:
    """``{"num_classes": n}`` when ``state``'s head is the stock head's last Linear with another number of outputs
    (a fine-tuned classifier), else ``{}``. The stock model is built on the meta device: no memory, no init."""
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            stock = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception:  # an unknown name or keyword: build() says which, with its hint
        return {}
    head = head_name(stock)
    if head is None:
        return {}
    last = [(n, m) for n, m in stock.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[0] == head]
    if not last:
        return {}
    key, linear = f"{last[-1][0]}.weight", last[-1][1]
    found = state.get(key)
    if found is not None and found.dim() == 2 and found.shape[1] == linear.in_features \
            and found.shape[0] != linear.out_features:
        return {"num_classes": int(found.shape[0])}
    return {}


def check_head(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """One line naming the keys when the checkpoint's head is another module stack than the architecture's."""
    head = head_name(module)
    if head is None:
        return
    ours = sorted(k for k in module.state_dict() if k.split(".")[0] == head)
    theirs = sorted(k for k in state if k.split(".")[0] == head)
    if theirs and ours != theirs:       # no head at all: the general check names the missing keys
        raise ModelSpecError(
            f"{where}: the classifier head is not this architecture's: the checkpoint has "
            f"{', '.join(theirs) or 'no head'} where the model has {', '.join(ours)}",
            hint="a one-Linear head of any size is read from the checkpoint (or set model.num_classes); for another "
                 "head pass the builder's options under model.kwargs, or save the weights without the head keys and "
                 "use strip: {features: true}")
