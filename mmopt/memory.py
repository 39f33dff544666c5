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


def overall_method(methods: set[str]) -> str:
    """How a figure built from several parts' figures was obtained: measured only when every part was."""
    return MEASURED_CUDA if methods == {MEASURED_CUDA} else ESTIMATED


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
            self.sections: dict[int, list[int]] = {}   # open section -> [current at entry, max since]
            self.on_alloc: Callable[[], None] | None = None

        def open(self) -> int:
            token = len(self.sections) + 1
            while token in self.sections:
                token += 1
            self.sections[token] = [self.current, self.current]
            return token

        def close(self, token: int) -> int:
            """Peak live bytes above the entry level while the section was open."""
            start, high = self.sections.pop(token)
            return high - start

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
                for section in self.sections.values():
                    section[1] = max(section[1], self.current)
                if self.on_alloc is not None:
                    self.on_alloc()
                weakref.finalize(storage, self._free, key, nbytes)
            return out

    return LiveBytes()


def _leaves(value: Any) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(value)


def measuring_copy(subject: Any, mode: Any = None, requires_grad: bool = False) -> Any:
    """A copy of ``subject`` (an ``nn.Module`` or a Model) to measure on, sharing nothing mutable with it.

    With a FakeTensorMode ``mode`` every parameter and buffer becomes a fake tensor (tied ones stay tied), so the
    copy allocates nothing real; without one the copy is real. Measuring must never change the model: some
    kernels rewrite their module on first use (bitsandbytes repacks 4-bit weights and their quantization state in
    place on CPUs with AVX512-BF16, LLM.int8 moves its weights into a state object), and a fake-tensor run of the
    model itself would leave fake tensors inside the real one."""
    import copy

    import torch.nn as nn

    from mmopt.model import Model

    root = subject.module if isinstance(subject, Model) else subject
    memo: dict[int, Any] = {}
    if mode is not None:
        for sub in root.modules():
            for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for value in store.values():
                    if value is None or id(value) in memo:
                        continue
                    if is_param and type(value) is not nn.Parameter:
                        # quantized weights (bitsandbytes' Params4bit, Int8Params) carry their quantization
                        # state on the Parameter object: they are copied for real (they are small) and become
                        # fake as the forward reads them
                        continue
                    fake = mode.from_tensor(value.detach())
                    if is_param:
                        fake = nn.Parameter(fake, requires_grad=requires_grad and value.requires_grad
                                            and value.is_floating_point())
                    memo[id(value)] = fake
    if isinstance(subject, Model):
        for key, value in subject.info.items():
            if key.startswith("_"):          # caches such as a tokenizer: read, never changed by a forward
                memo[id(value)] = value
    clone = copy.deepcopy(subject, memo)
    if mode is not None:
        for sub in _root_of(clone).modules():
            if getattr(sub, "support_avx512bf16_for_cpu", False):
                # The estimate is for CUDA, where bitsandbytes never repacks 4-bit weights; its CPU-only repacking
                # (on CPUs with AVX512-BF16) would count the weights as activations, through a kernel without a
                # fake version.
                sub.support_avx512bf16_for_cpu = False
    return clone


def _root_of(subject: Any) -> Any:
    from mmopt.model import Model

    return subject.module if isinstance(subject, Model) else subject


def trace_real(fn: Callable[..., Any], subject: Any, inputs: tuple) -> int:
    """Peak bytes of storages created while ``fn(copy, *inputs)`` runs without grad on a real copy of
    ``subject``: for kernels without a fake-tensor version. The copy's weights and the inputs are not counted."""
    import torch

    clone = measuring_copy(subject)
    tracker = _make_tracker()
    tracker.ignore(unique_tensors(_root_of(clone)) + _leaves(inputs))
    with torch.no_grad(), tracker:
        out = fn(clone, *inputs)
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


def peak_activation(fn: Callable[..., Any], subject: Any, inputs: tuple) -> Peak:
    """Peak activation of ``fn(subject, *inputs)``: measured on CUDA when the inputs live there; otherwise
    estimated on a fake copy of ``subject`` (a trace of a real CPU copy where a kernel has no fake version)."""
    import torch

    first = next((t for t in _leaves(inputs) if isinstance(t, torch.Tensor)), None)
    if first is not None and first.device.type == "cuda":
        return Peak(cuda_peak(lambda *a: fn(subject, *a), inputs), MEASURED_CUDA, "torch.cuda.max_memory_allocated")
    try:
        return Peak(trace_forward(fn, subject, inputs).peak_bytes, ESTIMATED, "fake-tensor trace")
    except Exception:  # an op without a fake kernel (some quantized kernels): trace the real CPU run instead
        return Peak(trace_real(fn, subject, inputs), ESTIMATED, "CPU trace")


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


# --- weight bytes under other storage formats (what-if) --------------------------------------------------

# Bytes per element of each storage format, and the per-block statistics its kernels keep. bitsandbytes int8
# (LLM.int8) keeps one float32 scale per output row; nf4 keeps one absmax per 64 weights, itself quantized to
# 8 bits with one float32 per 256 absmax values ("double quantization", bitsandbytes' default).
QUANT_FORMATS = {
    "int8": {"element_bytes": 1.0, "row_scale_bytes": 4, "block": None},
    "nf4": {"element_bytes": 0.5, "row_scale_bytes": 0, "block": 64, "absmax_bytes": 1, "absmax_group": 256},
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or its name ("float16")."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype.itemsize


def cast_weight_bytes(tensors: Any, dtype: Any) -> int:
    """Bytes of ``tensors`` if every floating one were stored as ``dtype`` (others unchanged)."""
    size = dtype_bytes(dtype)
    total = 0
    for t in tensors:
        total += t.numel() * size if t.is_floating_point() else tensor_bytes(t)
    return total


def quantized_tensor_bytes(weight: Any, method: str) -> int:
    """Bytes a Linear ``weight`` (out, in) occupies in bitsandbytes format ``method`` (int8 | nf4)."""
    fmt = QUANT_FORMATS[method]
    numel = weight.numel()
    if fmt["block"] is None:
        return int(math.ceil(numel * fmt["element_bytes"])) + weight.shape[0] * fmt["row_scale_bytes"]
    blocks = math.ceil(numel / fmt["block"])
    return (int(math.ceil(numel * fmt["element_bytes"])) + blocks * fmt["absmax_bytes"]
            + math.ceil(blocks / fmt["absmax_group"]) * 4)


def quantized_weight_bytes(module: Any, method: str, keep_dtype: Any = None) -> int:
    """Weight bytes of ``module`` if every ``nn.Linear`` weight were quantized to ``method``.

    Everything else (biases, norms, embeddings, convolutions, fused attention projections) stays as it is, or
    in ``keep_dtype`` (bitsandbytes computes in half precision, so the rest is usually cast too)."""
    import torch.nn as nn

    linear = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return _with_linear_quantized(linear, unique_tensors(module), method, keep_dtype)


def part_quantized_bytes(model: Any, part: str, method: str, keep_dtype: Any = None) -> int:
    """``quantized_weight_bytes`` for one part of a Model (its Linear layers quantized, the rest kept)."""
    import torch.nn as nn

    linear = [m.weight for _, m in model.named_modules(part) if isinstance(m, nn.Linear)]
    return _with_linear_quantized(linear, [t for _, t in model.named_tensors(part)], method, keep_dtype)


def _with_linear_quantized(linear: list, tensors: list, method: str, keep_dtype: Any) -> int:
    quantized = {id(w): w for w in linear}
    total = sum(quantized_tensor_bytes(w, method) for w in quantized.values())
    rest = [t for t in tensors if id(t) not in quantized]
    if keep_dtype is not None:
        return total + cast_weight_bytes(rest, keep_dtype)
    return total + sum(tensor_bytes(t) for t in rest)


def unique_tensors(module: Any) -> list:
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def module_weight_bytes(module: Any, recurse: bool = True) -> int:
    """Bytes of a module's parameters and buffers (its own only when ``recurse`` is False)."""
    tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    return unique_bytes(tensors)


# --- fake-tensor traces with module attribution, offload and training ------------------------------------

CUDA_BLOCK = 512   # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


def cuda_rounded(nbytes: int) -> int:
    """``nbytes`` as the CUDA caching allocator counts it (rounded up to 512-byte blocks)."""
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


@dataclass
class Trace:
    """One traced inference forward: its peak, each module's own peak, and the peak with block offload."""

    peak_bytes: int
    module_peaks: dict            # module name -> peak live bytes above those at its entry
    offload_peak_bytes: int | None = None    # activations + weights of the blocks running, at the worst moment
    offload_block: str | None = None         # the largest offloaded block
    offload_block_bytes: int = 0
    resident_bytes: int = 0                  # weights that no block holds: they stay on the GPU


def _holds_blocks(module: Any) -> bool:
    """A ModuleList / Sequential of blocks (items with submodules), not of plain layers (a downsample pair)."""
    import torch.nn as nn

    return isinstance(module, (nn.ModuleList, nn.Sequential)) and any(
        next(item.children(), None) is not None for item in module)


def offload_blocks(module: Any, prefix: str = "") -> list[str]:
    """The blocks weights move in when offloaded, names prefixed by ``prefix``: each item of a list of blocks
    (transformer layers, ResNet stages' blocks, MobileNet's feature blocks) and each other submodule with
    weights; modules holding such lists are opened. Weights of an opened module itself (a class token, a
    projection matrix) stay resident. ``mmopt.runtime.load_offloaded`` gives accelerate these same blocks."""
    blocks = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is None:
            continue
        full = prefix + name
        if _holds_blocks(child):
            blocks += [f"{full}.{i}" for i, item in child.named_children()
                       if next(item.parameters(), None) is not None]
        elif any(_holds_blocks(m) for m in child.modules()):
            blocks += offload_blocks(child, full + ".")
        else:
            blocks.append(full)
    return blocks


def _fake_inputs(mode: Any, inputs: tuple, batch: int | None) -> tuple:
    """Fake copies of ``inputs``; with ``batch``, inputs given at batch 1 are grown to ``batch`` rows on fake
    tensors, so a budget search at batch 4096 allocates nothing real."""
    import torch

    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        fake = mode.from_tensor(t)
        if batch is not None and batch != t.shape[0]:
            fake = fake[:1].expand(batch, *fake.shape[1:]).contiguous()
        out.append(fake)
    return tuple(out)


def trace_forward(fn: Callable[..., Any], subject: Any, inputs: tuple, modules: list[str] | None = None,
                  blocks: list[str] | None = None, scope: list | None = None, batch: int | None = None) -> Trace:
    """Trace ``fn(copy, *inputs)`` without grad on a fake copy of ``subject`` (an ``nn.Module`` or a Model; see
    ``measuring_copy``): the one inference tracer, used by ``optimize`` and ``profile`` alike.

    Peaks are attributed to the submodules named in ``modules``; with ``blocks`` (submodule names) it also
    gives the GPU peak if only the running block's weights were on the GPU, the weights of ``scope`` (tensors
    of ``subject``; default: all) in no block staying resident. With ``batch``, inputs are grown to that batch
    on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = _root_of(subject)
    tracker = _make_tracker()
    modules = modules or []
    starts: dict[str, list[int]] = {}
    module_peaks = {name: 0 for name in modules}
    block_bytes = {name: module_weight_bytes(root.get_submodule(name)) for name in (blocks or [])}
    state = {"on_gpu": 0, "offload_peak": 0}

    def enter(name):
        def hook(mod, args):
            starts.setdefault(name, []).append(tracker.open())
        return hook

    def leave(name):
        def hook(mod, args, out):
            module_peaks[name] = max(module_peaks[name], tracker.close(starts[name].pop()))
        return hook

    def block_in(name):
        def hook(mod, args):
            state["on_gpu"] += block_bytes[name]
            state["offload_peak"] = max(state["offload_peak"], tracker.current + state["on_gpu"])
        return hook

    def block_out(name):
        def hook(mod, args, out):
            state["offload_peak"] = max(state["offload_peak"], tracker.current + state["on_gpu"])
            state["on_gpu"] -= block_bytes[name]
        return hook

    tracker.on_alloc = lambda: state.__setitem__(
        "offload_peak", max(state["offload_peak"], tracker.current + state["on_gpu"]))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    clone = measuring_copy(subject, mode)      # outside the mode: real tensors the copy holds are copied for real
    clone_root = _root_of(clone)
    with mode:
        # hooks go on the copy, which is dropped afterwards: nothing to remove
        for name in modules:
            mod = clone_root.get_submodule(name)
            mod.register_forward_pre_hook(enter(name))
            mod.register_forward_hook(leave(name))
        for name in block_bytes:
            mod = clone_root.get_submodule(name)
            mod.register_forward_pre_hook(block_in(name))
            mod.register_forward_hook(block_out(name))
        fake_inputs = _fake_inputs(mode, inputs, batch)
        tracker.ignore(unique_tensors(clone_root) + _leaves(fake_inputs))
        with torch.no_grad(), tracker:
            out = fn(clone, *fake_inputs)
        del out, clone
    trace = Trace(peak_bytes=tracker.peak, module_peaks=module_peaks)
    if blocks is not None:
        in_blocks = {id(t) for name in block_bytes for t in unique_tensors(root.get_submodule(name))}
        resident = unique_bytes(t for t in (scope if scope is not None else unique_tensors(root))
                                if id(t) not in in_blocks)
        largest = max(block_bytes, key=block_bytes.get) if block_bytes else None
        trace.offload_peak_bytes = state["offload_peak"] + resident
        trace.offload_block = largest
        trace.offload_block_bytes = block_bytes.get(largest, 0) if largest else 0
        trace.resident_bytes = resident
    return trace


@dataclass
class TrainPeak:
    """The high-water mark of one training step (the second of two, so optimizer state exists) by kind."""

    peak_total_bytes: int
    breakdown: dict      # weights, gradients, optimizer_states, activations, temporaries, inputs (at the peak)
    method: str
    how: str


_KINDS = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer_states",
          "Activation": "activations", "Temp": "temporaries", "Other": "inputs"}


def _breakdown(snapshot: dict) -> dict:
    out = {kind: 0 for kind in dict.fromkeys(_KINDS.values())}
    for device_snap in snapshot.values():
        for key, value in device_snap.items():
            name = getattr(key, "value", key)
            if name in _KINDS:
                out[_KINDS[name]] += int(value)
    return out


def _peak_tracker(base: type) -> type:
    """MemTracker keeping only the global peak: its per-module peak snapshots (a deep copy for every module
    on the stack, at every op) triple the cost and profile does not use them."""

    class PeakOnly(base):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)   # a flat dict of ints: a shallow copy is enough

    return PeakOnly


def trace_train(step: Callable[..., Any], subject: Any, inputs: tuple, make_optimizer: Callable[[Any], Any],
                steps: int = 2, batch: int | None = None, prepare: Callable[[Any], None] | None = None) -> TrainPeak:
    """Estimate the peak of training steps ``step(copy, *inputs)`` (forward + backward, returns nothing)
    followed by ``optimizer.step()`` and ``zero_grad()``, on a fake copy of ``subject`` (``prepare(copy)`` first
    sets it up: which parameters train, checkpointing), with torch's MemTracker (which tells weights,
    gradients, optimizer state, activations and temporaries apart). Bytes are as the tensors hold them;
    ``cuda_rounded`` rounding is not applied (under a percent for these models; see docs/estimator.md)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    clone = measuring_copy(subject, mode, requires_grad=True)
    with mode:
        if prepare is not None:
            prepare(clone)
        root = _root_of(clone)
        fake_inputs = _fake_inputs(mode, inputs, batch)
        optimizer = make_optimizer([p for p in root.parameters() if p.requires_grad])
        tracker = _peak_tracker(MemTracker)()
        tracker.track_external(root, optimizer, *[t for t in fake_inputs if isinstance(t, torch.Tensor)])
        with tracker:
            for _ in range(steps):
                step(clone, *fake_inputs)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")
    breakdown = _breakdown(snapshot)
    return TrainPeak(sum(breakdown.values()), breakdown, ESTIMATED, "fake-tensor MemTracker")


def cuda_train_peak(step: Callable[..., Any], module: Any, inputs: tuple, make_optimizer: Callable[[Any], Any],
                    steps: int = 2) -> TrainPeak:
    """Measured on CUDA: max allocated over ``steps`` training steps, weights and inputs included."""
    import torch

    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(*inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del optimizer
    return TrainPeak(peak, {}, MEASURED_CUDA, "torch.cuda.max_memory_allocated")
