"""Peak activation memory of one inference forward, measured on CUDA or estimated, and latency.

Peak activation memory is the high-water mark of bytes allocated during one inference forward of a part minus
what was allocated just before it (weights and inputs). On CUDA it is measured with the allocator's counters.
Without CUDA it is estimated by running the forward under a dispatch mode that tracks the bytes of every
storage an op creates until that storage dies: on fake tensors (``trace_forward``, no real compute, so seconds
even for large models; the one inference tracer ``optimize`` and ``profile`` share), or, when an op has no
fake kernel, on real CPU tensors (``trace_real``). Every trace runs on a copy (``measuring_copy``): measuring
never changes the model.
"""
from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from mmopt.core import Model, Shapes
from mmopt.memory.counting import input_bytes, module_weight_bytes, unique_bytes, unique_tensors

if TYPE_CHECKING:
    from typing import TypeVar

    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmopt.adapters.base import Adapter

    Subject = TypeVar("Subject", nn.Module, Model)    # what a trace runs on: a module, or a Model and its parts

MEASURED_CUDA = "measured-cuda"
ESTIMATED = "estimated"
AMP = {"bf16": "bfloat16", "fp16": "float16"}    # --amp names -> the dtype autocast runs in



def overall_method(methods: set[str]) -> str:
    """How a figure built from several parts' figures was obtained: measured only when every part was."""
    return MEASURED_CUDA if methods == {MEASURED_CUDA} else ESTIMATED


def part_forward(adapter: Adapter, part: str, amp: str | None = None) -> Callable[..., torch.Tensor]:
    """``fn(model, *inputs)``: ``part``'s forward through the adapter (under autocast with ``amp``), the function
    every trace and measurement of a part runs."""
    import torch

    def forward(model: Model, *inputs: Any) -> torch.Tensor:
        if amp:
            device = "cuda" if any(getattr(t, "is_cuda", False) for t in inputs) else "cpu"
            with torch.autocast(device, dtype=getattr(torch, AMP[amp])):
                return adapter.run(model, part, inputs)
        return adapter.run(model, part, inputs)

    return forward


# --- what optimize measures of a part ---------------------------------------------------------------------------

LATENCY_MODES = ("full", "quick", "off")


def part_runtime(model: Model, adapter: Adapter, part: str, shapes: Shapes, latency: str = "full") -> dict:
    """Peak activation memory (measured on CUDA or estimated) and latency of one forward of ``part`` at ``shapes``.

    ``latency``: ``full`` times the forward at ``shapes``; ``quick`` times one forward at batch 1 and scales it
    to the batch (a CPU running float16 at batch 64 can take minutes, and the number is rarely what a CPU user
    came for); ``off`` skips it. When CUDA runs out of memory the batch is halved until it fits, and the result
    says at which batch.
    """
    import torch

    if latency not in LATENCY_MODES:
        raise ValueError(f"latency must be one of {LATENCY_MODES}, got {latency!r}")
    asked = shapes.batch_size
    while True:
        try:
            out = _runtime_at(model, adapter, part, shapes, latency)
            break
        except torch.cuda.OutOfMemoryError:
            if shapes.batch_size == 1:
                from mmopt.errors import UserError

                raise UserError(f"CUDA ran out of memory running {part} even at batch 1") from None
            torch.cuda.empty_cache()
            shapes = dataclasses.replace(shapes, batch_size=shapes.batch_size // 2)
    out["batch_size"] = shapes.batch_size
    if shapes.batch_size != asked:
        out["note"] = f"CUDA ran out of memory at batch {asked}; {part} measured at batch {shapes.batch_size}"
    return out


def _runtime_at(model: Model, adapter: Adapter, part: str, shapes: Shapes, latency: str) -> dict:
    inputs = adapter.example_inputs(model, part, shapes)
    forward = part_forward(adapter, part)
    peak = peak_activation(forward, model, inputs)
    out = {"peak_activation_bytes": peak.peak_bytes, "memory_method": peak.method, "memory_how": peak.how,
           "input_bytes": input_bytes(inputs)}
    if latency == "full" or (latency == "quick" and shapes.batch_size == 1):
        out["latency_ms"] = round(latency_ms(lambda *args: forward(model, *args), inputs), 3)
        out["latency_how"] = f"measured at batch {shapes.batch_size}"
    elif latency == "quick":
        one = adapter.example_inputs(model, part, dataclasses.replace(shapes, batch_size=1))
        single = latency_ms(lambda *args: forward(model, *args), one, repeats=1)
        out["latency_ms"] = round(single * shapes.batch_size, 3)
        out["latency_how"] = f"estimated: batch 1 measured, times {shapes.batch_size}"
    return out


@dataclass
class Peak:
    peak_bytes: int
    method: str          # measured-cuda | estimated
    how: str             # a few words: which estimator or counter


def peak_activation(fn: Callable[..., Any], subject: nn.Module | Model, inputs: tuple) -> Peak:
    """Peak activation of ``fn(subject, *inputs)``: measured on CUDA when the inputs live there; otherwise
    estimated on a fake copy of ``subject`` (a trace of a real CPU copy where a kernel has no fake version)."""
    import torch

    first = next((t for t in _leaves(inputs) if isinstance(t, torch.Tensor)), None)
    if first is not None and first.device.type == "cuda":
        return Peak(cuda_peak(lambda *a: fn(subject, *a), inputs), MEASURED_CUDA, "torch.cuda.max_memory_allocated")
    if has_llm_int8(root_of(subject)):
        return Peak(trace_forward(fn, subject, inputs).peak_bytes, ESTIMATED,
                    "fake-tensor trace, LLM.int8 as its CUDA allocations")
    try:
        return Peak(trace_forward(fn, subject, inputs).peak_bytes, ESTIMATED, "fake-tensor trace")
    except Exception:  # an op without a fake kernel (some quantized kernels): trace the real CPU run instead
        return Peak(trace_real(fn, subject, inputs), ESTIMATED, "CPU trace")


def has_llm_int8(root: nn.Module) -> bool:
    """Whether ``root`` holds bitsandbytes LLM.int8 layers (by type name: only the quantize pass imports it)."""
    return any(type(m).__name__ == "Linear8bitLt" for m in root.modules())


def _llm_int8_stand_ins(root: nn.Module) -> None:
    """Replace each LLM.int8 layer of a fake copy by a module allocating what its CUDA kernels allocate: the
    outlier split has a data-dependent shape and no fake-tensor kernel (``modules/alloc_models.py``)."""
    from mmopt.modules.alloc_models import LLMInt8Allocations

    for name, module in list(root.named_modules()):
        if type(module).__name__ == "Linear8bitLt":
            owner_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(owner_name) if owner_name else root, attr, LLMInt8Allocations.like(module))


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


# --- the live-bytes tracker and the copies it runs on ------------------------------------------------------------

def _storage_key(tensor: torch.Tensor) -> Any:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(tensor.untyped_storage())


def _make_tracker() -> Any:
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

        def ignore(self, tensors: list) -> None:
            """Storages that existed before the forward (weights, inputs): never counted. A tensor subclass's
            inner tensors too: a view of torchao's int8 ``qdata`` is not a new allocation."""
            from mmopt.memory.counting import inner_tensors

            for t in tensors:
                if isinstance(t, torch.Tensor):
                    for x in {id(y): y for y in [t, *inner_tensors(t)]}.values():
                        self.known.add(_storage_key(x))

        def _free(self, key: Any, nbytes: int) -> None:
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


def root_of(subject: nn.Module | Model) -> nn.Module:
    """The root module of a Model, or the module itself."""
    return subject.module if isinstance(subject, Model) else subject


def measuring_copy(subject: Subject, mode: FakeTensorMode | None = None, requires_grad: bool = False) -> Subject:
    """A copy of ``subject`` (an ``nn.Module`` or a Model) to measure on, sharing nothing mutable with it.

    With a FakeTensorMode ``mode`` every parameter and buffer becomes a fake tensor (tied ones stay tied), so the
    copy allocates nothing real; without one the copy is real. Measuring must never change the model: some
    kernels rewrite their module on first use (bitsandbytes repacks 4-bit weights and their quantization state in
    place on CPUs with AVX512-BF16, LLM.int8 moves its weights into a state object), and a fake-tensor run of the
    model itself would leave fake tensors inside the real one."""
    import copy

    import torch.nn as nn

    from mmopt.weights import is_wrapper

    root = root_of(subject)
    memo: dict[int, Any] = {}
    if mode is not None:
        for sub in root.modules():
            for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for value in store.values():
                    if value is None or id(value) in memo:
                        continue
                    if is_param and type(value) is not nn.Parameter and not is_wrapper(value):
                        # quantized weights (bitsandbytes' Params4bit, Int8Params) carry their quantization
                        # state on the Parameter object: they are copied for real (they are small) and become
                        # fake as the forward reads them
                        continue
                    fake = fake_of(mode, value.detach())
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
        for sub in root_of(clone).modules():
            if getattr(sub, "support_avx512bf16_for_cpu", False):
                # The estimate is for CUDA, where bitsandbytes never repacks 4-bit weights; its CPU-only repacking
                # (on CPUs with AVX512-BF16) would count the weights as activations, through a kernel without a
                # fake version.
                sub.support_avx512bf16_for_cpu = False
    return clone


def trace_real(fn: Callable[..., Any], subject: nn.Module | Model, inputs: tuple) -> int:
    """Peak bytes of storages created while ``fn(copy, *inputs)`` runs without grad on a real copy of
    ``subject``: for kernels without a fake-tensor version. The copy's weights and the inputs are not counted."""
    import torch

    clone = measuring_copy(subject)
    tracker = _make_tracker()
    tracker.ignore(unique_tensors(root_of(clone)) + _leaves(inputs))
    with torch.no_grad(), tracker:
        out = fn(clone, *inputs)
    del out
    return tracker.peak


def fake_of(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    """A fake copy of ``tensor``; a meta tensor (a model built without memory, for streaming) becomes a fake CPU
    tensor, so that it is traced through the same kernels as the loaded model would be."""
    import torch

    if tensor.device.type != "meta":
        return mode.from_tensor(tensor)
    with mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")


def fake_inputs(mode: FakeTensorMode, inputs: tuple, batch: int | None) -> tuple:
    """Fake copies of ``inputs``; with ``batch``, inputs given at batch 1 are grown to ``batch`` rows on fake
    tensors, so a budget search at batch 4096 allocates nothing real."""
    import torch

    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        fake = fake_of(mode, t)
        if batch is not None and batch != t.shape[0]:
            fake = fake[:1].expand(batch, *fake.shape[1:]).contiguous()
        out.append(fake)
    return tuple(out)


# --- the fake-tensor trace: peaks per module, and with block offload ---------------------------------------------

@dataclass
class Trace:
    """One traced inference forward: its peak, each module's own peak, and the peak with block offload."""

    peak_bytes: int
    module_peaks: dict            # module name -> peak live bytes above those at its entry
    offload_peak_bytes: int | None = None    # activations + weights of the blocks running, at the worst moment
    offload_block: str | None = None         # the largest offloaded block
    offload_block_bytes: int = 0
    resident_bytes: int = 0                  # weights that no block holds: they stay on the GPU


def trace_forward(fn: Callable[..., Any], subject: nn.Module | Model, inputs: tuple, modules: list[str] | None = None,
                  blocks: list[str] | None = None, scope: list | None = None, batch: int | None = None) -> Trace:
    """Trace ``fn(copy, *inputs)`` without grad on a fake copy of ``subject`` (an ``nn.Module`` or a Model; see
    ``measuring_copy``): the one inference tracer, used by ``optimize`` and ``profile`` alike.

    Peaks are attributed to the submodules named in ``modules``; with ``blocks`` (submodule names) it also
    gives the GPU peak if only the running block's weights were on the GPU, the weights of ``scope`` (tensors
    of ``subject``; default: all) in no block staying resident. With ``batch``, inputs are grown to that batch
    on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = root_of(subject)
    tracker = _make_tracker()
    modules = modules or []
    starts: dict[str, list[int]] = {}
    module_peaks = {name: 0 for name in modules}
    block_bytes = {name: module_weight_bytes(root.get_submodule(name)) for name in (blocks or [])}
    state = {"on_gpu": 0, "offload_peak": 0}

    def enter(name: str) -> Callable:
        def hook(mod, args):
            starts.setdefault(name, []).append(tracker.open())
        return hook

    def leave(name: str) -> Callable:
        def hook(mod, args, out):
            module_peaks[name] = max(module_peaks[name], tracker.close(starts[name].pop()))
        return hook

    def block_in(name: str) -> Callable:
        def hook(mod, args):
            state["on_gpu"] += block_bytes[name]
            state["offload_peak"] = max(state["offload_peak"], tracker.current + state["on_gpu"])
        return hook

    def block_out(name: str) -> Callable:
        def hook(mod, args, out):
            state["offload_peak"] = max(state["offload_peak"], tracker.current + state["on_gpu"])
            state["on_gpu"] -= block_bytes[name]
        return hook

    tracker.on_alloc = lambda: state.__setitem__(
        "offload_peak", max(state["offload_peak"], tracker.current + state["on_gpu"]))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    clone = measuring_copy(subject, mode)      # outside the mode: real tensors the copy holds are copied for real
    clone_root = root_of(clone)
    with mode:
        if has_llm_int8(clone_root):
            _llm_int8_stand_ins(clone_root)
        # hooks go on the copy, which is dropped afterwards: nothing to remove
        for name in modules:
            mod = clone_root.get_submodule(name)
            mod.register_forward_pre_hook(enter(name))
            mod.register_forward_hook(leave(name))
        for name in block_bytes:
            mod = clone_root.get_submodule(name)
            mod.register_forward_pre_hook(block_in(name))
            mod.register_forward_hook(block_out(name))
        faked = fake_inputs(mode, inputs, batch)
        tracker.ignore(unique_tensors(clone_root) + _leaves(faked))
        with torch.no_grad(), tracker:
            out = fn(clone, *faked)
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
