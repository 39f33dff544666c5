"""One-time CUDA allocations a forward makes that no trace of the model's ops sees.

The first matrix product on a CUDA stream makes torch allocate the cuBLAS workspace through its caching
allocator: on an H200 a fresh process running ViT-B-32 (fp32, batch 1) peaked at 34.8 MiB where the trace of its
ops gives 1.8 MiB. It is allocated once per (handle, stream) and kept, so it belongs on its own line, not in the
per-batch activation peak.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

KIB = 1024
# torch's defaults (ATen/cuda/CublasHandlePool.cpp): ":4096:8" (32 MiB) from compute capability 9.0 (Hopper)
# on, ":4096:2:16:8" (8.125 MiB) before it.
HOPPER_DEFAULT = ":4096:8"
OLDER_DEFAULT = ":4096:2:16:8"


@dataclass(frozen=True)
class OneTime:
    what: str
    bytes: int
    method: str     # measured-cuda | estimated
    how: str


def cublas_workspace(capability: tuple[int, int] | None, env: Mapping[str, str] = os.environ) -> OneTime:
    """The cuBLAS workspace torch allocates on the first matmul, for a GPU of ``capability`` (None: no GPU here,
    assume a Hopper-class one, the GPUs the estimator was checked against)."""
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    source = "CUBLAS_WORKSPACE_CONFIG"
    if not config or parse_workspace_config(config) is None:
        hopper = capability is None or capability >= (9, 0)
        config = HOPPER_DEFAULT if hopper else OLDER_DEFAULT
        source = ("torch's default for compute capability >= 9.0" if hopper
                  else "torch's default below compute capability 9.0")
        if capability is None:
            source += " (no GPU here: a Hopper-class GPU assumed)"
    return OneTime("cuBLAS workspace", parse_workspace_config(config), "estimated", f"{config}, {source}")


def parse_workspace_config(config: str) -> int | None:
    """Bytes of a ``:SIZE_KiB:COUNT[:SIZE_KiB:COUNT...]`` setting; None when it does not parse."""
    numbers = re.fullmatch(r"(:\d+:\d+)+", config.strip())
    if not numbers:
        return None
    values = [int(v) for v in config.strip().split(":")[1:]]
    return sum(size * KIB * count for size, count in zip(values[::2], values[1::2]))
