"""Crash-safe DeepSpeed checkpoints.

DeepSpeed's ``save_checkpoint`` writes the ``latest`` file itself, possibly
before every rank finished writing.  Here it is called with
``save_latest=False``; after all ranks are done (barrier) rank 0 writes
``latest`` atomically (temp file, fsync, ``os.replace``).  A kill at any moment
therefore leaves ``latest`` naming a complete checkpoint (or no ``latest`` at
all); a partially written tag directory is never referenced, and is
overwritten when training reaches that step again.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist

__all__ = ["save", "read_latest", "load_latest", "tag_for_step", "write_latest"]

LATEST = "latest"


def tag_for_step(step: int) -> str:
    return f"global_step{int(step)}"


def _step_of(tag: str) -> Optional[int]:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m.group(1)) if m else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_latest(ckpt_dir: str, tag: str) -> None:
    """Atomically point ``ckpt_dir/latest`` at ``tag``."""
    path = os.path.join(ckpt_dir, LATEST)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_latest(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ValueError(f"checkpoint dir {ckpt_dir}: 'latest' names {tag!r}, which does not exist")
    return tag


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int = 2) -> str:
    """Save on all ranks, then publish it as ``latest``; keep the ``keep`` newest."""
    tag = tag_for_step(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if _rank() == 0:
        write_latest(ckpt_dir, tag)
        if keep > 0:
            steps = sorted(s for s in (_step_of(t) for t in os.listdir(ckpt_dir)) if s is not None)
            for s in steps:
                # drop older complete checkpoints and stale partial ones beyond the latest
                if s < step and s not in steps[-keep:]:
                    shutil.rmtree(os.path.join(ckpt_dir, tag_for_step(s)), ignore_errors=True)
    _barrier()
    return tag


def load_latest(engine, ckpt_dir: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Load the checkpoint ``latest`` names; ``(None, {})`` when there is none."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None, {}
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    # DeepSpeed restores the scheduler's position but not the learning rate it had
    # written into the optimizer: re-apply it, or the first resumed step uses the
    # initial (warmup) lr and the run drifts from an uninterrupted one
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and hasattr(sched, "last_batch_iteration"):
        sched.step(sched.last_batch_iteration)
    return tag, client_state or {}
