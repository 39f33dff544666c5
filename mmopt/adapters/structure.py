"""Module surgery the adapters share: head slicing, positional-embedding interpolation, layer lists, part swaps
and gradient checkpointing of block lists. Family-neutral: each adapter says where its modules are."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.core import Model


# --- heads -----------------------------------------------------------------------------------------------------

def slice_linear(linear: nn.Linear, out_idx: Sequence[int] | None = None, in_idx: Sequence[int] | None = None) -> None:
    """Keep rows ``out_idx`` and columns ``in_idx`` of an ``nn.Linear`` in place (features updated)."""
    import torch

    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if out_idx is not None:
        weight, bias = weight[out_idx], (bias[out_idx] if bias is not None else None)
        linear.out_features = len(out_idx)
    if in_idx is not None:
        weight = weight[:, in_idx]
        linear.in_features = len(in_idx)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)


def head_rows(keep: list[int], head_dim: int) -> list[int]:
    """Row (or column) indices of heads ``keep`` in a projection laid out head after head."""
    return [h * head_dim + i for h in keep for i in range(head_dim)]


# --- layers and resolution ---------------------------------------------------------------------------------------

def keep_in_list(layers: nn.ModuleList, keep: list[int]) -> nn.ModuleList:
    """A new ModuleList of ``layers[i] for i in keep``; per-layer indices (used by caches) renumbered."""
    import torch.nn as nn

    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
    return kept


def check_patch_multiple(size: int, patch: int) -> None:
    """A ViT's input side must be a whole number of patches; say which sizes work."""
    from mmopt.errors import UserError

    if size % patch == 0 and size >= patch:
        return
    below = max(patch, size // patch * patch)
    near = sorted({below, below + patch})
    raise UserError(f"image_size {size} is not a multiple of the patch size {patch}; sizes that work: "
                    f"multiples of {patch}, e.g. {', '.join(str(s) for s in near)}")


def interpolate_positions(pos: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """Resize a ViT positional embedding (tokens, dim) from a ``grid``² to a ``new_grid``² patch grid.

    Tokens before the grid (the class token) are kept as they are; the grid is resampled bicubically.
    """
    import torch

    prefix = pos.shape[0] - grid * grid
    if prefix < 0:
        raise ValueError(f"positional embedding of {pos.shape[0]} tokens has no {grid}x{grid} grid")
    head, body = pos[:prefix], pos[prefix:]
    dim = body.shape[-1]
    body = body.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    body = torch.nn.functional.interpolate(body, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([head, body], dim=0)


# --- parts --------------------------------------------------------------------------------------------------------

def clear_attribute(owner: nn.Module, attr: str) -> None:
    """Set submodule or parameter ``owner.<attr>`` to None, so a dropped part's weights go. A parametrized
    parameter (the quantize pass's int8 tables) is unregistered first: assigning to it would hand None to the
    parametrization's ``right_inverse``."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(owner, attr):
        try:
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        except ValueError:      # made of several tensors (int8 table + scales): torch must compute it once
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
    setattr(owner, attr, None)


# --- part swaps --------------------------------------------------------------------------------------------------

def install_swapped(model: Model, part: str, module: nn.Module, attrs: list[str], root_is_part: bool) -> None:
    """Put ``module`` (which maps the part's inputs to its embedding) in place of ``part``.

    ``attrs``: the root attributes that made up the part (set to None); with ``root_is_part`` the root module
    itself was the part and is replaced by a container. Either way the new part lives at root attribute
    ``part`` and ``model.info["swapped"]`` tells the adapter's ``run`` to call it.
    """
    import torch.nn as nn

    if root_is_part:
        container = nn.Module()
        config = getattr(model.module, "config", None)
        if config is not None:
            container.config = config           # tokenizer and example inputs still read the vocabulary
        setattr(container, part, module)
        model.module = container
    else:
        for attr in attrs:
            setattr(model.module, attr, None)
        setattr(model.module, part, module)
    model.info["part_prefixes"][part] = [f"{part}."]
    model.info.setdefault("swapped", {})[part] = part


def run_swapped(model: Model, part: str, inputs: tuple) -> torch.Tensor | None:
    """The output of a swapped part, or None when ``part`` is not swapped."""
    attr = model.info.get("swapped", {}).get(part)
    if attr is None:
        return None
    return getattr(model.module, attr)(*inputs)


# --- blocks: gradient checkpointing and offload ------------------------------------------------------------------

def holds_blocks(module: nn.Module, sequential_only: bool = False) -> bool:
    """Whether ``module`` is a list of blocks: a ModuleList or Sequential (only Sequential with
    ``sequential_only``) whose items have submodules, not one of plain layers like a downsample pair."""
    import torch.nn as nn

    kinds = (nn.Sequential,) if sequential_only else (nn.ModuleList, nn.Sequential)
    return isinstance(module, kinds) and any(next(item.children(), None) is not None for item in module)


def checkpoint_blocks(root: nn.Module) -> int:
    """Gradient checkpointing for models without their own switch (torchvision, open_clip's ResNets): every
    item of the outermost ``nn.Sequential`` containers of blocks (ResNet stages, MobileNet's features)
    recomputes its activations in backward (torch.utils.checkpoint, non-reentrant). The weights and state-dict
    keys do not change: only the instances' ``forward`` is wrapped. Returns how many blocks were wrapped."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    def wrap(block: nn.Module) -> None:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if block.training and torch.is_grad_enabled():
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        block.forward = forward

    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for child in module.children():
            if holds_blocks(child, sequential_only=True):
                for block in child:
                    if next(block.parameters(), None) is not None:
                        wrap(block)
                        count += 1
            else:
                visit(child)

    visit(root)
    return count


def uncheckpoint_blocks(root: nn.Module) -> None:
    """Undo ``checkpoint_blocks`` on ``root``: drop the instance-level ``forward`` wrappers. A deep copy of a
    wrapped model shares the wrapper functions, which would still run the original's blocks."""
    for module in root.modules():
        module.__dict__.pop("forward", None)
