"""Bytes and parameters of tensors, modules and parts, and what they would take in another storage format.

The only place (with the tracers) that turns tensors into bytes: ``numel() * element_size()`` for elements,
``untyped_storage().nbytes()`` for what memory really holds, ``dtype.itemsize`` for a format not yet applied.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.core import Model

CUDA_BLOCK = 512   # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements (a view counts its own elements)."""
    return tensor.numel() * tensor.element_size()


def input_bytes(inputs: tuple, batch_size: int | None = None) -> int:
    """Bytes of the tensors in ``inputs``; with ``batch_size``, as if they had that many rows (inputs built at
    batch 1 and grown on fake tensors)."""
    import torch

    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    total = sum(tensor_bytes(t) for t in tensors)
    if batch_size is None or not tensors:
        return total
    return batch_size * total // max(1, tensors[0].shape[0])


def cuda_rounded(nbytes: int) -> int:
    """``nbytes`` as the CUDA caching allocator counts it (rounded up to 512-byte blocks)."""
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


def logical_numel(tensor: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight stands for its unpacked shape."""
    shape = getattr(tensor, "logical_shape", None)       # mmopt's 4-bit tables (modules/quantized.py)
    if shape is not None:
        return math.prod(shape)
    state = getattr(tensor, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return tensor.numel()


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or for a tensor subclass that wraps others (torchao's
    ``Int8Tensor``: int8 ``qdata`` + float ``scale``) those, recursively. Such a wrapper's own
    ``untyped_storage().nbytes()`` reports the bytes of its logical (float) dtype, not what memory holds."""
    from mmopt.weights import is_wrapper

    if not is_wrapper(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def unique_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or viewed tensors count once; tensor subclasses
    by their inner tensors)."""
    seen: set = set()
    total = 0
    for outer in tensors:
        if outer is None:
            continue
        for tensor in inner_tensors(outer):
            total += _new_bytes(tensor, seen)
    return total


def _new_bytes(tensor: torch.Tensor, seen: set) -> int:
    """Bytes of ``tensor``'s storage unless ``seen`` already holds it (then 0); adds it to ``seen``."""
    if tensor.device.type == "meta":
        key: object = id(tensor)
    else:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device, storage.nbytes())
    if key in seen:
        return 0
    seen.add(key)
    return tensor.untyped_storage().nbytes() if tensor.device.type != "meta" else tensor_bytes(tensor)


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of ``module``, each tensor once."""
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def module_weight_bytes(module: nn.Module, recurse: bool = True) -> int:
    """Bytes of a module's parameters and buffers (its own only when ``recurse`` is False)."""
    tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    return unique_bytes(tensors)


# --- parts -------------------------------------------------------------------------------------------------------

def part_state(model: Model, part: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of ``part`` (quantization state included)."""
    return {k: v for k, v in model.module.state_dict().items() if v is not None and model.owns(part, k)}


def part_params(model: Model, part: str) -> int:
    """Logical parameter count of ``part``."""
    return sum(logical_numel(p) for _, p in model.named_tensors(part, buffers=False))


def part_weight_bytes(model: Model, part: str) -> int:
    """Bytes the part's weights and buffers occupy in memory, as saved (quantization state included)."""
    return unique_bytes(part_state(model, part).values())


def part_sizes(model: Model, part: str) -> dict:
    """``params`` and ``weight_bytes`` of ``part``: the size rows of the optimize report."""
    return {"params": part_params(model, part), "weight_bytes": part_weight_bytes(model, part)}


def is_low_bit(tensor: torch.Tensor) -> bool:
    """Whether a parameter is stored in 8 or 4 bits (int8 rows, torchao int8, bitsandbytes int8 or packed 4-bit)."""
    import torch

    return inner_tensors(tensor)[0].dtype in (torch.int8, torch.uint8)


def quantized_fraction(model: Model, part: str) -> float:
    """Share of ``part``'s logical parameters stored in 8 or 4 bits."""
    total = quantized = 0
    for _, tensor in model.named_tensors(part, buffers=False):
        n = logical_numel(tensor)
        total += n
        quantized += n if is_low_bit(tensor) else 0
    return quantized / total if total else 0.0


def module_table(model: Model, part: str) -> list[dict]:
    """Params and bytes of each top-level module of ``part`` (for profile), largest first."""
    groups: dict[str, list] = {}
    counts: dict[str, int] = {}
    prefixes = model.part_prefixes(part)
    for key, tensor in part_state(model, part).items():
        groups.setdefault(_head(key, prefixes), []).append(tensor)
    for name, tensor in model.named_tensors(part, buffers=False):
        head = _head(name, prefixes)
        counts[head] = counts.get(head, 0) + logical_numel(tensor)
    rows = [{"module": name, "params": counts.get(name, 0), "bytes": unique_bytes(ts)} for name, ts in groups.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["module"]))


def _head(key: str, prefixes: list[str]) -> str:
    """The top-level module a state-dict key belongs to, below the part's own prefix."""
    base = next((p for p in prefixes if key.startswith(p) and p), "")
    rest = key[len(base):]
    return base + rest.split(".")[0] if "." in rest else key


# --- weight bytes under other storage formats (what-if) ---------------------------------------------------------

# Bytes per element of each storage format, and the per-block statistics its kernels keep. bitsandbytes int8
# (LLM.int8) keeps one float32 scale per output row; nf4 keeps one absmax per 64 weights, itself quantized to
# 8 bits with one float32 per 256 absmax values ("double quantization", bitsandbytes' default).
QUANT_FORMATS = {
    "int8": {"element_bytes": 1.0, "row_scale_bytes": 4, "block": None},
    "nf4": {"element_bytes": 0.5, "row_scale_bytes": 0, "block": 64, "absmax_bytes": 1, "absmax_group": 256},
}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name ("float16")."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype.itemsize


def cast_weight_bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | str) -> int:
    """Bytes of ``tensors`` if every floating one were stored as ``dtype`` (others unchanged)."""
    size = dtype_bytes(dtype)
    total = 0
    for t in tensors:
        total += t.numel() * size if t.is_floating_point() else tensor_bytes(t)
    return total


def quantized_tensor_bytes(weight: torch.Tensor, method: str) -> int:
    """Bytes a Linear ``weight`` (out, in) occupies in bitsandbytes format ``method`` (int8 | nf4)."""
    fmt = QUANT_FORMATS[method]
    numel = weight.numel()
    if fmt["block"] is None:
        return int(math.ceil(numel * fmt["element_bytes"])) + weight.shape[0] * fmt["row_scale_bytes"]
    blocks = math.ceil(numel / fmt["block"])
    return (int(math.ceil(numel * fmt["element_bytes"])) + blocks * fmt["absmax_bytes"]
            + math.ceil(blocks / fmt["absmax_group"]) * 4)


def quantized_weight_bytes(module: nn.Module, method: str, keep_dtype: torch.dtype | str | None = None) -> int:
    """Weight bytes of ``module`` if every ``nn.Linear`` weight were quantized to ``method``.

    Everything else (biases, norms, embeddings, convolutions, fused attention projections) stays as it is, or
    in ``keep_dtype`` (bitsandbytes computes in half precision, so the rest is usually cast too)."""
    import torch.nn as nn

    linear = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return _with_linear_quantized(linear, unique_tensors(module), method, keep_dtype)


def part_quantized_bytes(model: Model, part: str, method: str, keep_dtype: torch.dtype | str | None = None) -> int:
    """``quantized_weight_bytes`` for one part of a Model (its Linear layers quantized, the rest kept)."""
    import torch.nn as nn

    linear = [m.weight for _, m in model.named_modules(part) if isinstance(m, nn.Linear)]
    return _with_linear_quantized(linear, [t for _, t in model.named_tensors(part)], method, keep_dtype)


def _with_linear_quantized(linear: list, tensors: list, method: str, keep_dtype: torch.dtype | str | None) -> int:
    quantized = {id(w): w for w in linear}
    total = sum(quantized_tensor_bytes(w, method) for w in quantized.values())
    rest = [t for t in tensors if id(t) not in quantized]
    if keep_dtype is not None:
        return total + cast_weight_bytes(rest, keep_dtype)
    return total + sum(tensor_bytes(t) for t in rest)
