"""Running optimized models within a memory budget: CPU offload, a batch size that backs off on CUDA
out-of-memory, and video frames through an image part a window at a time. See docs/runtime.md.

Offload and the batch back-off are accelerate's (``AlignDevicesHook`` per block, ``find_executable_batch_size``);
this module only chooses the blocks and wires them to mmopt checkpoints.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from mmopt.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


def offload(module: nn.Module, device: str | torch.device = "cuda") -> nn.Module:
    """Keep ``module``'s weights in CPU memory and move each block (``memory.estimator.offload_blocks``) to ``device``
    only while it runs: one accelerate ``AlignDevicesHook`` per block (``offload=True``, the whole block at once,
    so a block's layers that read each other's weights, like attention's output projection, stay together).
    Weights outside any block move to ``device`` for good. Returns the module."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from mmopt.memory.estimator import offload_blocks

    device = torch.device(device)
    blocks = offload_blocks(module)
    under = tuple(name + "." for name in blocks)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not name.startswith(under):
            tensor.data = tensor.data.to(device)
    for name in blocks:
        add_hook_to_module(module.get_submodule(name),
                           AlignDevicesHook(execution_device=device, offload=True, io_same_device=False,
                                            offload_buffers=True, place_submodules=True))
    return module


def load_offloaded(path: str | Path, parts: list[str] | None = None, device: str | torch.device = "cuda") -> nn.Module:
    """``mmopt.load`` an optimized checkpoint into CPU memory and offload it block by block to ``device``.

    The GPU then holds the activations, the running block's weights and the few weights outside any block:
    ``mmopt profile MODEL --offload cpu`` estimates that peak."""
    from mmopt import api

    module = api.load(path, parts=parts, device="cpu")
    model = module.mmopt_model
    offload(module, device)
    module.mmopt_model = model
    return module


def auto_batch_size(function: Callable[..., Any], start: int = 128) -> tuple[Any, int]:
    """Call ``function(batch_size)`` from ``start``, shrinking the batch (x0.9, accelerate's
    ``find_executable_batch_size``) each time it runs out of CUDA memory; return (result, batch size used).

    ``mmopt profile MODEL --budget 8GiB`` gives a good ``start``."""
    from accelerate.utils import find_executable_batch_size

    if start < 1:
        raise UserError(f"auto_batch_size: start must be a positive batch size, got {start}")
    used = {}

    @find_executable_batch_size(starting_batch_size=start)
    def attempt(batch_size: int) -> Any:
        used["batch_size"] = batch_size
        return function(batch_size)

    result = attempt()
    return result, used["batch_size"]


def encode_frames(module: nn.Module, frames: torch.Tensor | Iterable[torch.Tensor], window: int,
                  part: str = "visual") -> torch.Tensor:
    """Embeddings of video ``frames`` (a (N, 3, H, W) tensor or an iterable of (3, H, W) / (k, 3, H, W)
    tensors) through the image ``part`` of a model from ``mmopt.load``, ``window`` frames at a time, so the
    activation memory is that of a batch of ``window``. Returns a (N, dim) float tensor on the CPU."""
    from mmopt import registry
    from mmopt.fidelity import embeddings

    if window < 1:
        raise UserError(f"encode_frames: window must be at least 1, got {window}")
    model = getattr(module, "mmopt_model", None)
    if model is None:
        raise UserError("encode_frames needs a model from mmopt.load (it carries its parts and preprocessing)")
    model.check_part(part)
    adapter = registry.adapter_for(model.source)
    device = model.part_device(part)
    windows = _windows(frames, window)
    first = next(windows, None)
    if first is None:
        raise UserError("encode_frames: no frames given")
    batches = ((chunk.to(device),) for chunk in itertools.chain([first], windows))
    return embeddings(model, adapter, part, batches)


def _windows(frames: torch.Tensor | Iterable[torch.Tensor], window: int) -> Iterator[torch.Tensor]:
    import torch

    if isinstance(frames, torch.Tensor):
        if frames.dim() != 4:
            raise UserError(f"encode_frames: expected frames of shape (N, 3, H, W), got {tuple(frames.shape)}")
        for start in range(0, frames.shape[0], window):
            yield frames[start:start + window]
        return
    pending: list = []
    count = 0
    for frame in frames:
        frame = frame.unsqueeze(0) if frame.dim() == 3 else frame
        pending.append(frame)
        count += frame.shape[0]
        while count >= window:
            batch = torch.cat(pending)
            yield batch[:window]
            rest = batch[window:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if pending:
        yield torch.cat(pending)
