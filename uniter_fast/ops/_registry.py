"""Backend registry behind every public op in :mod:`uniter_fast.ops`.

Each op module registers its backends here with a priority and an
availability predicate.  ``backend="auto"`` picks the available backend with
the highest priority for the tensors' device and dtype; a named backend that
cannot run here raises :class:`BackendUnavailableError` with the reason.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch

__all__ = [
    "BackendUnavailableError", "register", "resolve", "use_backend",
    "available_backends", "registered_backends", "current_backend",
]


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run on this machine/input."""


@dataclass(frozen=True)
class _Backend:
    name: str
    impl: Callable[[], Callable]          # lazy loader: returns the function
    available: Callable[[torch.device, torch.dtype], Optional[str]]
    priority: int                         # higher wins under "auto"
    auto: Union[bool, Callable[[torch.device, torch.dtype], bool]]  # may "auto" pick it (here)?


_OPS: Dict[str, Dict[str, _Backend]] = {}
_state = threading.local()


def register(op: str, name: str, impl: Callable[[], Callable], *,
             available: Callable[[torch.device, torch.dtype], Optional[str]] = lambda d, t: None,
             priority: int = 0,
             auto: Union[bool, Callable[[torch.device, torch.dtype], bool]] = True) -> None:
    """Register backend ``name`` of ``op``.

    ``impl`` is called lazily (first use) and returns the implementation, so
    importing :mod:`uniter_fast` never compiles or imports Triton/C++ code.
    ``available(device, dtype)`` returns ``None`` when the backend can run,
    otherwise a short human-readable reason why not.  ``auto`` may also be a
    predicate ``auto(device, dtype) -> bool`` (e.g. a Triton backend that runs
    on CPU only through the slow interpreter: selectable by name there, never
    picked by "auto").
    """
    _OPS.setdefault(op, {})[name] = _Backend(
        name, functools.lru_cache(maxsize=None)(impl), available, priority, auto)


def triton_available(device: torch.device, dtype: torch.dtype,
                     dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> Optional[str]:
    """Availability of a Triton backend: CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 (the interpreter: a test tool, see :func:`on_cuda`)."""
    if dtype not in dtypes:
        return f"needs one of {[str(d).replace('torch.', '') for d in dtypes]}, got {dtype}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    return f"runs on CUDA (or CPU with TRITON_INTERPRET=1), not {device.type}"


def on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """``auto=`` predicate for Triton backends: "auto" picks them on CUDA only,
    never the slow CPU interpreter."""
    return device.type == "cuda"


def registered_backends(op: str) -> List[str]:
    """Every backend of ``op``, highest priority first."""
    _check_op(op)
    return sorted(_OPS[op], key=lambda n: -_OPS[op][n].priority)


def _auto_ok(b: _Backend, device: torch.device, dtype: torch.dtype) -> bool:
    return bool(b.auto(device, dtype)) if callable(b.auto) else bool(b.auto)


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")


def _reason(b: _Backend, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        return b.available(device, dtype)
    except Exception as e:  # an import failure etc. is a reason, not a crash
        return f"{type(e).__name__}: {e}"


def available_backends(op: str, device: Union[str, torch.device, None] = None,
                       dtype: Optional[torch.dtype] = None) -> List[str]:
    """Backends of ``op`` that can run here, in "auto" preference order: the
    first is what ``backend="auto"`` picks.

    ``device`` defaults to CUDA when present, else CPU; ``dtype`` to float32.
    """
    _check_op(op)
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    names = [n for n in registered_backends(op) if _reason(_OPS[op][n], dev, dtype) is None]
    # stable sort: what "auto" may pick here first, test-only paths (interpreter) last
    return sorted(names, key=lambda n: not _auto_ok(_OPS[op][n], dev, dtype))


def current_backend(op: str) -> str:
    sel = getattr(_state, "selection", None)
    if sel is None:
        return "auto"
    if isinstance(sel, str):
        return sel if sel in _OPS.get(op, {}) else "auto"
    return sel.get(op, "auto")


@contextlib.contextmanager
def use_backend(name: Union[str, Mapping[str, str]]) -> Iterator[None]:
    """Switch every op at once: ``with use_backend("reference"): ...``.

    A string applies to every op that has a backend of that name; ops that do
    not have it stay on ``"auto"`` (e.g. ``use_backend("cpp")`` switches IPOT
    and leaves attention alone).  A mapping ``{op: backend}`` selects per op.
    Unknown names raise immediately.
    """
    if isinstance(name, str):
        if name != "auto" and not any(name in b for b in _OPS.values()):
            raise ValueError(f"unknown backend {name!r}; registered: "
                             f"{sorted({n for b in _OPS.values() for n in b})}")
    else:
        name = dict(name)
        for op, b in name.items():
            _check_op(op)
            if b != "auto" and b not in _OPS[op]:
                raise ValueError(f"op {op!r} has no backend {b!r}; "
                                 f"registered: {registered_backends(op)}")
    prev = getattr(_state, "selection", None)
    _state.selection = name
    try:
        yield
    finally:
        _state.selection = prev


def resolve(op: str, backend: Optional[str], device: torch.device,
            dtype: torch.dtype) -> Callable:
    """Return the implementation of ``op`` for this call."""
    _check_op(op)
    backends = _OPS[op]
    if backend is None or backend == "auto":
        backend = current_backend(op)
    if backend == "auto":
        reasons = []
        for n in registered_backends(op):
            b = backends[n]
            if not _auto_ok(b, device, dtype):
                continue
            r = _reason(b, device, dtype)
            if r is None:
                return b.impl()
            reasons.append(f"{n}: {r}")
        raise BackendUnavailableError(
            f"no backend of {op!r} can run on {device} with {dtype}: " + "; ".join(reasons))
    if backend not in backends:
        raise ValueError(f"op {op!r} has no backend {backend!r}; "
                         f"registered: {registered_backends(op)}")
    r = _reason(backends[backend], device, dtype)
    if r is not None:
        raise BackendUnavailableError(
            f"backend {backend!r} of op {op!r} is unavailable for {device}/{dtype}: {r}")
    return backends[backend].impl()
