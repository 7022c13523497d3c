"""Stop on SIGINT / SIGTERM with a checkpoint.

The first SIGINT or SIGTERM only sets a flag: the trainer finishes the current
optimizer step, agrees with the other ranks (one tiny all-reduce per step),
saves a checkpoint at that step on every rank, publishes ``latest`` and exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).

A second signal at least :data:`REPEAT_GRACE_S` after the first exits at once
(exit status ``128 + signal``, no checkpoint; ``latest`` still names the last
complete one).  Repeats within the grace period are taken as the same stop
delivered twice -- launchers forward the signal they get to their workers
(``torchrun`` sends the same one, DeepSpeed's launcher SIGTERM), and a
terminal's Ctrl-C reaches every process of the group -- so they do not cut the
save short.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional

from ..constants import STOP_SIGNALS

__all__ = ["StopRequest", "REPEAT_GRACE_S", "STOP_SIGNALS"]

REPEAT_GRACE_S = 1.0


class StopRequest:
    """Signal handler state: ``signum`` is the first stop signal received (or None)."""

    def __init__(self, exit_fn: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic, stream=None):
        self.signum: Optional[int] = None
        self._t0 = 0.0
        self._exit, self._clock = exit_fn, clock
        self._stream = stream
        self._old: Dict[int, object] = {}
        self._pid: Optional[int] = None

    def _say(self, msg: str) -> None:
        s = self._stream or sys.stderr
        try:
            s.write(f"[uniter_fast] {msg}\n")
            s.flush()
        except (OSError, ValueError):
            pass

    def handler(self, signum: int, frame=None) -> None:
        if self._pid is not None and os.getpid() != self._pid:
            # a process forked from the trainer (a DataLoader worker before its
            # worker_init_fn ran): the trainer handles the stop, not this process
            return
        name = signal.Signals(signum).name
        now = self._clock()
        if self.signum is None:
            self.signum, self._t0 = signum, now
            self._say(f"{name} received: finishing the current step, then saving a checkpoint "
                      f"and exiting with status {128 + signum}; send it again to stop at once")
            return
        if now - self._t0 < REPEAT_GRACE_S:
            return                      # the same stop, delivered twice (launcher, terminal)
        self._say(f"second {name}: exiting at once without a checkpoint")
        self._exit(128 + signum)

    def install(self) -> bool:
        """Install the handlers (main thread only); False where that is impossible."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._pid = os.getpid()
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self.handler)
        return True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
