"""The precisions a distillation step computes in: bfloat16 where the device multiplies it natively.

Why: labelling is most of a distillation step when the teacher is the larger model. all-mpnet-base-v2 labelled
16 texts of the engine's batches in 0.965 s in float32 and 0.500 s under bfloat16 autocast on the 2-core CPU (AMX),
against 0.707 s for all-MiniLM-L6-v2's float32 forward, backward and AdamW step: 28 % of a float32 swap step saved.
The labels' sentence embeddings kept a cosine of 0.99998 to float32's (min 0.99995; tokens min 0.9998), and the
recipes' outputs moved in the fourth digit (scripts/bench_teacher_labels.py, 3 Dec 2026; docs/distillation.md). Where bfloat16 is emulated it is
slower than float32, so ``auto`` asks the hardware. Held-out scores, refits and fidelity stay in float32.

The student's forward and backward (``train_precision``) follow the same rule: bfloat16 autocast, with the weights,
their gradients and AdamW's states kept in float32 (mixed precision; bfloat16 keeps float32's exponent range, so
no loss scaling). all-MiniLM-L6-v2's training step on 16 of the engine's texts took 0.707 s in float32 and 0.528 s
under bfloat16 autocast on the 2-core CPU (AMX); with mpnet's bfloat16 labels a swap step 1.028 s against float32's
1.671 s. The recipes' scores moved in the fourth digit or not at all (scripts/bench_teacher_labels.py,
docs/distillation.md: "The student in bfloat16").
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal, get_args

# the options' values (``teacher_labels``, ``train_precision`` in options.py), in one place
Precision = Literal["auto", "float32", "bfloat16"]
CHOICES = get_args(Precision)


def resolve(choice: str, device_type: str) -> str:
    """``choice`` as a decision for a device type: "bfloat16" or "float32"."""
    if choice not in CHOICES:
        raise ValueError(f"unknown precision {choice!r} (one of {CHOICES})")
    if choice != "auto":
        return choice
    return "bfloat16" if native_bfloat16(device_type) else "float32"


def native_bfloat16(device_type: str) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware: CUDA GPUs that support it, CPUs with AMX or
    AVX512-BF16 (torch's own probes; absent ones count as no)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def computing_in(dtype: str, device_type: str) -> Any:
    """The context a forward runs in for ``dtype`` (from ``resolve``): bfloat16 autocast, or nothing for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)
