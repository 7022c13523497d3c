"""Resumable task loaders and UNITER's MetaLoader (task mixing by mix ratio).

:class:`TaskLoader` cycles one task's dataset forever, epoch after epoch, with
token-bucket batches; its position is ``(epoch, offset)`` (batches consumed in
the epoch), so :meth:`state_dict` / :meth:`load_state_dict` resume the exact
data order.  :class:`MetaLoader` picks one task per optimizer step with
probability proportional to its mix ratio from a ``random.Random(seed)``
that every rank seeds identically, so all ranks train the same task at every
step without communication (required for ZeRO's collective reductions).
"""
from __future__ import annotations

import random
import signal
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch.utils.data import ConcatDataset, DataLoader

from ..constants import STOP_SIGNALS
from .sampler import TokenBucketSampler

__all__ = ["ConcatDatasetWithLens", "TaskLoader", "MetaLoader", "move_to_device"]


class ConcatDatasetWithLens(ConcatDataset):
    """Concatenation of several txt/img db pairs of one task (UNITER's multi-db entries)."""

    def __init__(self, datasets):
        super().__init__(datasets)

    @property
    def lens(self) -> List[int]:
        return [n for d in self.datasets for n in d.lens]

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGINT / SIGTERM.  A terminal's
    Ctrl-C and many schedulers signal the whole process group; a worker started by
    spawn / forkserver would otherwise die of it (KeyboardInterrupt) under the
    trainer, and a forked one inherits the trainer's handler (which does nothing
    outside the trainer's process, see uniter_fast.training.signals).  The main
    process stops, saves and ends its workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class TaskLoader:
    def __init__(self, dataset, collate_fn: Callable, sampler: TokenBucketSampler,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.collate_fn, self.sampler = dataset, collate_fn, sampler
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.epoch, self.offset = 0, 0
        self._it = None

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._it = None

    def _start_epoch(self) -> None:
        self.dataset.set_epoch(self.epoch)
        batches = self.sampler.batches(self.dataset.lens, self.epoch)
        if not batches:
            raise ValueError(f"{type(self.dataset).__name__}: an epoch yields no batch "
                             f"({len(self.dataset.lens)} examples, batch_size="
                             f"{self.sampler.max_tok} tokens, droplast={self.sampler.droplast})")
        self._n_batches = len(batches)
        remaining = batches[self.offset:]
        self._it = iter(self._loader(remaining, self.epoch))

    def epoch_batches(self, epoch: int = 0):
        """An iterable over one full epoch (for validation); does not move the position."""
        self.dataset.set_epoch(epoch)
        return self._loader(self.sampler.batches(self.dataset.lens, epoch), epoch)

    def _loader(self, batches, epoch: int) -> DataLoader:
        # a private generator: creating an iterator must not draw from the global torch
        # RNG (that would shift dropout masks, e.g. after a resume)
        g = torch.Generator()
        g.manual_seed(self.sampler.seed * 1_000_003 + epoch)
        return DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=g,
                          worker_init_fn=ignore_stop_signals if self.num_workers else None)

    def next_batch(self) -> Dict[str, Any]:
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            self.offset += 1
            return batch


class MetaLoader:
    """Yields ``(task_name, batch)`` forever; one task per ``accum_steps`` micro-batches."""

    def __init__(self, loaders: Dict[str, Tuple[TaskLoader, int]], accum_steps: int = 1,
                 seed: int = 0):
        if not loaders:
            raise ValueError("MetaLoader needs at least one task")
        self.loaders = {n: lr[0] for n, lr in loaders.items()}
        self.pool: List[str] = []
        for n, (_, ratio) in loaders.items():
            if int(ratio) != ratio or ratio < 0:
                raise ValueError(f"mix ratio of {n!r} must be a non-negative int, got {ratio!r}")
            self.pool.extend([n] * int(ratio))
        if not self.pool:
            raise ValueError("all mix ratios are 0")
        self.accum_steps = int(accum_steps)
        self.rng = random.Random(seed)
        self.step = 0
        self.task = self.pool[0]

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "task": self.task, "rng": _rng_state_to_list(self.rng),
                "loaders": {n: l.state_dict() for n, l in self.loaders.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.task = int(state["step"]), state["task"]
        self.rng.setstate(_rng_state_from_list(state["rng"]))
        for n, s in state["loaders"].items():
            if n not in self.loaders:
                raise ValueError(f"checkpoint has data state for task {n!r}, which this config "
                                 f"does not train (tasks: {sorted(self.loaders)})")
            self.loaders[n].load_state_dict(s)

    def __iter__(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        while True:
            yield self.next()

    def next(self) -> Tuple[str, Dict[str, Any]]:
        if self.step % self.accum_steps == 0:
            self.task = self.rng.choice(self.pool)
        self.step += 1
        return self.task, self.loaders[self.task].next_batch()


def _rng_state_to_list(rng: random.Random):
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _rng_state_from_list(s):
    return (s[0], tuple(s[1]), s[2])


def move_to_device(batch: Any, device, non_blocking: bool = True) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch
