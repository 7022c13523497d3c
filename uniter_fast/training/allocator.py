"""CPU training: keep freed memory in the process instead of returning it to the system.

glibc's ``malloc`` serves every block over 32 MiB (a UNITER-base word-embedding gradient
is 89 MiB; the MLM decoder's, their sum and the Adam states of that matrix as many) with a
fresh ``mmap`` and gives it back at ``free``: each training step then page-faults those
blocks in again, about 50 ms per 89 MiB on one core (``benchmarks/bench_step.py``'s
``allocator`` rows).  :func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (big blocks come
from the heap, which glibc still extends with ``mmap`` when it cannot grow) and a 2 GiB
``M_TRIM_THRESHOLD`` (freed memory stays mapped for the next step).  The process's
resident memory then stays at its peak; GPU memory is not concerned.

The trainer (``train.py``, ``finetune.py``) calls it on CPU; ``UNITER_FAST_KEEP_FREED_MEMORY=0``
turns it off.  Without glibc (musl, macOS) it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Optional

__all__ = ["KEEP_FREED_MEMORY_ENV", "keep_freed_memory", "allocator_state"]

log = logging.getLogger(__name__)

#: environment variable: "0" leaves glibc's defaults in place
KEEP_FREED_MEMORY_ENV = "UNITER_FAST_KEEP_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: the trim threshold: a C int, so at most 2 GiB - 1
_TRIM_THRESHOLD = 2 ** 31 - 1

_state = {"kept": False}


def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory(enable: Optional[bool] = None) -> bool:
    """Keep freed memory for reuse (see the module's text); returns whether it is on.

    ``enable=None``: on unless ``UNITER_FAST_KEEP_FREED_MEMORY`` is ``0``/``false``/``no``.
    Irreversible for the process (glibc's adaptive thresholds end at the first mallopt):
    ``enable=False`` only leaves the defaults alone."""
    if enable is None:
        enable = os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip().lower() not in (
            "0", "false", "no", "off")
    if not enable or _state["kept"]:
        return _state["kept"]
    libc = _glibc()
    if libc is None:
        log.info("keep_freed_memory: not glibc, malloc left as it is")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and \
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("keep_freed_memory: glibc refused mallopt; malloc left as it is")
    _state["kept"] = ok
    return ok


def allocator_state() -> str:
    """"kept" when :func:`keep_freed_memory` took effect in this process, else "default"."""
    return "kept" if _state["kept"] else "default"
