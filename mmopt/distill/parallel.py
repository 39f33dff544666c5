"""Distillation data-parallel over several processes (issue 13): ``accelerate launch``, ``torchrun`` or ``mmopt
optimize --processes N`` start one process per rank with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); gloo joins them on CPUs, NCCL on CUDA (one GPU per process: LOCAL_RANK).

Every rank runs the whole recipe up to its passes alike (load, passes that do not learn); only the learning
step is shared, so that each step is the single process's step up to float rounding:

- each rank draws the global batch a single process would draw (same seed, same augmentations) and keeps one
  contiguous shard of it: only its shard goes through the teacher and the student;
- the loss a rank sees is the global batch's (each rank's loss weighted by its share of the samples and summed
  over ranks); the gradient it backpropagates is its own share, and the shares are summed across ranks as each
  parameter's gradient is accumulated (what DDP does, without wrapping the modules the adapters run);
- the held-out split is sharded too and its score summed over ranks: the range test, the held-out curve, the
  best step and the early stop are the same numbers on every rank;
- the ranks start from rank 0's weights and, at the end, compare what they decided and a checksum of the trained
  weights: a difference is an error, never a silent disagreement.

One difference from a single process remains: the token-matching loss averages over tokens, and a shard's
average is weighted here by its samples, not its tokens (shards of a length-sorted batch differ a little).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import torch

    from mmopt.distill.data import TensorData, TextData


def world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0: the process that writes the output and prints the report."""
    return rank() == 0


def active() -> bool:
    """Several processes joined in a process group (the distillation shares its steps)."""
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


@contextmanager
def group(device: str) -> Iterator[None]:
    """Join the launcher's processes for the duration of a run (nothing with one process): gloo on CPUs, NCCL on
    CUDA with this process's GPU (LOCAL_RANK) as its current device."""
    if world_size() <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    from mmopt.errors import UserError

    if not dist.is_available():
        raise UserError(f"{world_size()} processes were launched, but this torch has no torch.distributed")
    cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank got here (a rank that failed makes the others fail here, or its launcher stops them)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def _device() -> str:
    import torch
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def _sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


# --- the shared step ---------------------------------------------------------------------------------------------

class ShardedData:
    """A run's data (``TextData`` / ``TensorData``) of which this rank sees one contiguous shard of every batch."""

    def __init__(self, data: TextData | TensorData, rank_: int, world: int):
        self.data, self.rank, self.world = data, rank_, world
        self.share = (0, 0)     # (samples of this rank, samples of the global batch) of the latest training batch

    def __getattr__(self, name: str) -> Any:     # kind, really_held, describe_augmentation, ...
        return getattr(self.data, name)

    def _mine(self, batch: tuple) -> tuple:
        n = _rows(batch)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return _slice(batch, lo, hi), hi - lo, n

    def next_batch(self) -> tuple:
        from mmopt.errors import UserError

        mine, k, n = self._mine(self.data.next_batch())
        if n < self.world:
            raise UserError(f"a batch of {n} samples cannot be shared by {self.world} processes",
                            hint=f"use batch_size >= {self.world}, or fewer processes")
        self.share = (k, n)
        return mine

    def held_batches(self) -> Iterable[tuple]:
        for batch in self.data.held_batches():
            mine, k, _ = self._mine(batch)
            if k:
                yield mine


def _rows(batch: Any) -> int:
    """Samples in a batch: a tensor's rows, or those of the first tensor in (nested) tuples. A student with its own
    tokenizer gets batches of (its inputs, the original's inputs)."""
    return _rows(batch[0]) if isinstance(batch, tuple) else int(batch.shape[0])


def _slice(batch: Any, lo: int, hi: int) -> Any:
    return tuple(_slice(t, lo, hi) for t in batch) if isinstance(batch, tuple) else batch[lo:hi]


def shard(data: TextData | TensorData) -> TextData | TensorData | ShardedData:
    """``data`` as this rank sees it: the same object with one process."""
    return ShardedData(data, rank(), world_size()) if active() else data


def global_loss(loss: torch.Tensor, data: Any) -> torch.Tensor:
    """With several processes: a loss whose value is the global batch's and whose gradient is this rank's share of
    the global gradient (the shares are summed by ``shared_gradients``)."""
    if not isinstance(data, ShardedData):
        return loss
    k, n = data.share
    mine = loss * (k / n)
    (total,) = _sum([float(mine.detach())])
    return mine + (total - mine).detach()


def mean(values: Sequence[torch.Tensor]) -> float:
    """The mean of per-sample scores over every rank's samples."""
    import torch

    local = torch.cat(list(values)) if values else torch.zeros(0)
    if not active():
        return float(local.mean())
    total, count = _sum([float(local.double().sum()), float(local.numel())])
    return total / count


def summed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed element-wise over ranks (in one process: as given)."""
    if active():
        import torch.distributed as dist

        for value in tensors.values():
            dist.all_reduce(value)
    return tensors


def total(count: int) -> int:
    """A count summed over ranks."""
    return int(_sum([count])[0]) if active() else count


@contextmanager
def shared_gradients(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """While open, every gradient accumulated into ``params`` is summed across ranks at once (DDP's all-reduce,
    parameter by parameter). Every rank first takes rank 0's weights, after checking that their shapes agree."""
    if not active():
        yield
        return
    import torch
    import torch.distributed as dist

    _same_shapes(params)
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad)) for p in params]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _first_other(mine: object) -> tuple[int, object] | None:
    """(rank, value) of the first process whose ``mine`` differs from this one's, or None when all agree."""
    import torch.distributed as dist

    every: list = [None] * world_size()
    dist.all_gather_object(every, mine)
    return next(((other, value) for other, value in enumerate(every) if value != mine), None)


def _same_shapes(params: Sequence[torch.Tensor]) -> None:
    mine = [tuple(p.shape) for p in params]
    differing = _first_other(mine)
    if differing:
        other, shapes = differing
        raise RuntimeError(f"process {other} trains other parameters than process {rank()} "
                           f"({len(shapes)} vs {len(mine)} tensors or different shapes): its passes differed")


def check_agreement(params: Sequence[torch.Tensor], stats: dict) -> None:
    """Raise unless every rank ended with the same decisions (rate, steps, curve) and the same weights."""
    if not active():
        return
    mine = [stats["lr"], stats["steps"], stats["best_step"], *[s for _, s in stats["curve"]],
            sum(float(p.detach().double().sum()) for p in params)]
    differing = _first_other(mine)
    if differing:
        other, values = differing
        raise RuntimeError(f"distillation diverged between processes {other} and {rank()}: "
                           f"{values[:3]} vs {mine[:3]} (rate, steps, best step) or their weights differ")
