"""Giving freed host memory back to the operating system (glibc), so peak resident memory follows what is live.

glibc serves allocations above a threshold with their own mmap and returns them on free, but it raises that
threshold (up to 32 MiB) each time such a block is freed: after the first model is freed, later tensors of a few
MiB come from its heap, and the heap keeps their pages when they are freed. A cast of ViT-L-14 peaked about
0.5 GiB above what was live. Fixing the threshold and trimming after large frees keeps the two together.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache

M_MMAP_THRESHOLD = -3           # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # tensors of 1 MiB and more: their own mapping, returned to the system when freed


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim      # noqa: B018 - glibc only (musl, macOS have neither)
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold() -> bool:
    """Stop glibc from raising its mmap threshold; True when it took effect."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release() -> None:
    """Collect garbage and return free heap pages to the system (a no-op where glibc is not the allocator)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
