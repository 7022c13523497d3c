"""Process group, device and CPU thread setup (also for a plain ``python`` run)."""
from __future__ import annotations

import os
import socket

import torch

from .allocator import keep_freed_memory

__all__ = ["init_distributed", "setup_device", "barrier"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """deepspeed.init_distributed, also for a plain ``python uniter_fast/train.py``.

    Returns ``(rank, world_size, accelerator)``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op
        # (deepspeed_shm_comm, minutes on a small machine) when the comm backend is
        # created; it only serves inference all-reduce.  Training uses gloo.
        try:
            import deepspeed.ops as ds_ops
            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except (ImportError, AttributeError):
            pass
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size(), acc


def setup_device(acc, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank; on CPU, a sane intra-op thread count and freed memory kept
    for reuse (:func:`uniter_fast.training.allocator.keep_freed_memory`)."""
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
        return torch.device(acc.device_name(), local_rank)
    keep_freed_memory()
    if "OMP_NUM_THREADS" not in os.environ:
        # small models on a shared CPU: oversubscribed intra-op threads are far slower
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * max(1, local))))
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
