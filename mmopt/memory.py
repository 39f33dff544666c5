"""Every byte count in mmopt: tensors, parts, and peak activation memory (measured on CUDA or estimated).

Peak activation memory is the high-water mark of bytes allocated during one inference forward of a part
minus what was allocated just before it (weights and inputs). On CUDA it is measured with the allocator's
counters. Without CUDA it is estimated by running the forward under a dispatch mode that tracks the bytes of
every storage an op creates until that storage dies: on fake tensors (no real compute, so seconds even for
large models), or, when an op has no fake kernel, on real CPU tensors.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

MEASURED_CUDA = "measured-cuda"
ESTIMATED = "estimated"


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor's elements (a view counts its own elements)."""
    return tensor.numel() * tensor.element_size()


def storage_bytes(tensor: Any) -> int:
    return tensor.untyped_storage().nbytes()


def logical_numel(tensor: Any) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight stands for its unpacked shape."""
    state = getattr(tensor, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return tensor.numel()


def unique_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or viewed tensors count once)."""
    seen: set = set()
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device, storage.nbytes()) if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes() if tensor.device.type != "meta" else tensor_bytes(tensor)
    return total


def part_state(model: Any, part: str) -> dict:
    """The state-dict entries of ``part`` (quantization state included)."""
    return {k: v for k, v in model.module.state_dict().items() if v is not None and model.owns(part, k)}


def part_params(model: Any, part: str) -> int:
    """Logical parameter count of ``part``."""
    return sum(logical_numel(p) for _, p in model.named_tensors(part, buffers=False))


def is_low_bit(tensor: Any) -> bool:
    """Whether a parameter is stored in 8 or 4 bits (int8 rows, bitsandbytes int8 or packed 4-bit)."""
    import torch

    return tensor.dtype in (torch.int8, torch.uint8)


def quantized_fraction(model: Any, part: str) -> float:
    """Share of ``part``'s logical parameters stored in 8 or 4 bits."""
    total = quantized = 0
    for _, tensor in model.named_tensors(part, buffers=False):
        n = logical_numel(tensor)
        total += n
        quantized += n if is_low_bit(tensor) else 0
    return quantized / total if total else 0.0


def part_weight_bytes(model: Any, part: str) -> int:
    """Bytes the part's weights and buffers occupy in memory, as saved (quantization state included)."""
    return unique_bytes(part_state(model, part).values())


def module_table(model: Any, part: str) -> list[dict]:
    """Params and bytes of each top-level module of ``part`` (for profile), largest first."""
    groups: dict[str, list] = {}
    counts: dict[str, int] = {}
    prefixes = model.part_prefixes(part)
    for key, tensor in part_state(model, part).items():
        base = next((p for p in prefixes if key.startswith(p) and p), "")
        rest = key[len(base):]
        head = base + rest.split(".")[0] if "." in rest else key
        groups.setdefault(head, []).append(tensor)
    for name, tensor in model.named_tensors(part, buffers=False):
        base = next((p for p in prefixes if name.startswith(p) and p), "")
        rest = name[len(base):]
        head = base + rest.split(".")[0] if "." in rest else name
        counts[head] = counts.get(head, 0) + logical_numel(tensor)
    rows = [{"module": name, "params": counts.get(name, 0), "bytes": unique_bytes(ts)} for name, ts in groups.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["module"]))


# --- peak activation memory ------------------------------------------------------------------------------

@dataclass
class Peak:
    peak_bytes: int
    method: str          # measured-cuda | estimated
    how: str             # a few words: which estimator or counter


def _storage_key(tensor: Any):
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(tensor.untyped_storage())


def _make_tracker():
    """A dispatch mode counting the bytes of storages ops create, while they live."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.known: set = set()
            self.current = 0
            self.peak = 0

        def ignore(self, tensors) -> None:
            """Storages that existed before the forward (weights, inputs): never counted."""
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self.known.add(_storage_key(t))

        def _free(self, key, nbytes: int) -> None:
            self.current -= nbytes
            self.known.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = _storage_key(t)
                if key in self.known:
                    continue
                nbytes = storage.nbytes()
                self.known.add(key)
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key, nbytes)
            return out

    return LiveBytes()


def _leaves(value: Any) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(value)


def trace_peak(fn: Callable[..., Any], inputs: tuple, module: Any, fake: bool = True) -> int:
    """Peak bytes of storages created while ``fn(*inputs)`` runs without grad.

    With ``fake`` the weights and inputs are converted to fake tensors first, so nothing is computed.
    """
    import torch

    tracker = _make_tracker()
    tensors = list(module.parameters()) + list(module.buffers())
    if not fake:
        tracker.ignore(tensors + _leaves(inputs))
        with torch.no_grad(), tracker:
            out = fn(*inputs)
        del out
        return tracker.peak
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        # The mode memoises real -> fake conversion, so these are the very fakes the forward will use.
        fakes = [mode.from_tensor(t) for t in tensors]
        fake_inputs = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        tracker.ignore(fakes + _leaves(fake_inputs))
        with torch.no_grad(), tracker:
            out = fn(*fake_inputs)
        del out
    return tracker.peak


def cuda_peak(fn: Callable[..., Any], inputs: tuple) -> int:
    """Measured on CUDA: max allocated during the forward minus allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = fn(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def peak_activation(fn: Callable[..., Any], inputs: tuple, module: Any) -> Peak:
    """Measure on CUDA when the inputs live there; otherwise estimate on fake tensors (CPU trace as fallback)."""
    import torch

    first = next((t for t in _leaves(inputs) if isinstance(t, torch.Tensor)), None)
    if first is not None and first.device.type == "cuda":
        return Peak(cuda_peak(fn, inputs), MEASURED_CUDA, "torch.cuda.max_memory_allocated")
    try:
        return Peak(trace_peak(fn, inputs, module, fake=True), ESTIMATED, "fake-tensor trace")
    except Exception:  # an op without a fake kernel (some quantized kernels): trace the real CPU run instead
        return Peak(trace_peak(fn, inputs, module, fake=False), ESTIMATED, "CPU trace")


def latency_ms(fn: Callable[..., Any], inputs: tuple, repeats: int = 3, slow_ms: float = 1000.0) -> float:
    """Median wall time of ``fn(*inputs)`` in ms. The first run doubles as warm-up unless it is slow
    (over ``slow_ms``, e.g. float16 on a CPU), in which case it is the measurement: more runs would say little."""
    import torch

    cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in _leaves(inputs))

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*inputs)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    with torch.inference_mode():
        first = timed()
        if first > slow_ms:
            return first
        times = sorted(timed() for _ in range(repeats))
    return times[len(times) // 2]
