"""Helpers every task's validation uses: equal batch counts under ZeRO-3, and
summing metric counters over ranks."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Sequence, Tuple

import torch

from ..data import move_to_device

__all__ = ["val_batches", "reduce_sums"]


def val_batches(loader, ctx) -> Iterator[Tuple[Dict[str, Any], bool]]:
    """``(batch on device, is_real)`` over one validation epoch.

    Under ZeRO-3 every forward is collective, so every rank runs the same number of
    forwards: a rank with fewer batches repeats its last one with ``is_real=False``
    (its outputs must not be counted).  Batches are read one at a time (a real
    validation split does not fit in memory).
    """
    import torch.distributed as dist
    epoch = loader.epoch_batches(0)
    n_local = len(epoch)                 # the sampler's batch count: nothing read yet
    n = torch.tensor([n_local], dtype=torch.long)
    if ctx.zero_stage == 3 and ctx.world_size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    last = None
    for last in epoch:
        yield move_to_device(last, ctx.device), True
    for _ in range(n_local, int(n)):
        if last is not None:
            yield move_to_device(last, ctx.device), False


def reduce_sums(sums: Dict[str, float], keys: Sequence[str], world_size: int) -> Dict[str, float]:
    """Sum the counters ``keys`` of ``sums`` over all ranks (float64)."""
    import torch.distributed as dist
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}
