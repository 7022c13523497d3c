"""Backend registry behind every public op in :mod:`uniter_fast.ops`.

Each op module registers its backends here.  A backend has

* ``available(device, dtype) -> reason | None``: can it run on this device and
  dtype at all (installed, compiled, right device type)?  Evaluated once per
  (device type, dtype) and cached.
* ``accepts(call) -> reason | None`` (optional): can it run *this* call?  It
  sees the call's tensors (:class:`Call`), so a kernel can decline a shape
  (e.g. a head dimension it was not written for) with a reason.
* ``priority``: higher is preferred by ``backend="auto"``.
* ``auto``: may "auto" pick it on this device/dtype (``True``/``False`` or a
  predicate ``auto(device, dtype)``, cached like ``available``) -- the Triton
  interpreter on CPU is selectable by name, never picked by "auto".
* ``prefer(call) -> bool`` (optional): does "auto" want it for this call?
  Measured policies live here (on CPU, SDPA only from the sequence length at
  which it beats the reference).

Resolution is cached per (op, selection, device type, dtype).  For an op none
of whose candidates looks at the call (layer norm, GELU, IPOT) a call costs a
dictionary lookup; otherwise only the per-call predicates run.

Under ``torch.compile`` the resolution runs at trace time, never in the
compiled graph: dynamo reads the selection (:func:`use_backend`'s thread-local
state, guarded, so switching backends recompiles) and the per-call predicates
(shape checks become guards), while everything that may import or build a
backend (``available``, the cached plans) is evaluated eagerly through
:func:`torch.compiler.assume_constant_result` functions (:func:`_static_info`,
:func:`_plan_of`), which dynamo calls instead of tracing.  Op wrappers whose
backend is a registered custom op (the C++/CUDA/Triton kernels, see
docs/ops.md) ask only for the backend's *name* (:func:`selected_backend`) and
pass it to the custom op, which loads the implementation when it runs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

__all__ = [
    "BackendUnavailableError", "Call", "register", "unregister", "resolve", "load", "use_backend",
    "available_backends", "registered_backends", "current_backend", "unavailable_reason",
    "selected_backend", "clear_cache",
]


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run on this machine/input."""


@dataclass(frozen=True)
class Call:
    """What per-call predicates see: the op's device, dtype and named inputs
    (tensors and arguments, e.g. ``call["q"]``).  ``inputs`` is empty when a
    question is asked without a call (``available_backends(op)``): predicates
    must then answer for "some call" (``call.get(name)`` returns None)."""
    op: str
    device: torch.device
    dtype: torch.dtype
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.inputs[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.inputs.get(name, default)

    @property
    def needs_grad(self) -> bool:
        """True when autograd will differentiate through this call (grad mode
        on and some input tensor requires grad): the call runs forward + backward."""
        if not torch.is_grad_enabled():
            return False
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in self.inputs.values())


Reason = Optional[str]


@dataclass(frozen=True)
class _Backend:
    name: str
    impl: Callable[[], Callable]          # lazy loader: returns the function
    available: Callable[[torch.device, torch.dtype], Reason]
    priority: int
    auto: Union[bool, Callable[[torch.device, torch.dtype], bool]]
    accepts: Optional[Callable[[Call], Reason]]
    prefer: Optional[Callable[[Call], bool]]


_OPS: Dict[str, Dict[str, _Backend]] = {}
_state = threading.local()
_lock = threading.Lock()
# (op, backend, device type, dtype) -> (reason, auto-eligible)
_static: Dict[Tuple[str, str, str, torch.dtype], Tuple[Reason, bool]] = {}
# (op, selection, device type, dtype) -> _Plan
_plans: Dict[Tuple[str, str, str, torch.dtype], "_Plan"] = {}
# (op, backend) -> the loaded implementation (``impl()``, called once)
_impls: Dict[Tuple[str, str], Callable] = {}


def register(op: str, name: str, impl: Callable[[], Callable], *,
             available: Optional[Callable[[torch.device, torch.dtype], Reason]] = None,
             priority: int = 0,
             auto: Union[bool, Callable[[torch.device, torch.dtype], bool]] = True,
             accepts: Optional[Callable[[Call], Reason]] = None,
             prefer: Optional[Callable[[Call], bool]] = None) -> None:
    """Register backend ``name`` of ``op`` (see the module docstring).

    ``impl`` is called lazily (first use) and returns the implementation, so
    importing :mod:`uniter_fast` never compiles or imports Triton/C++ code.
    """
    with _lock:
        _OPS.setdefault(op, {})[name] = _Backend(
            name, impl, available or (lambda d, t: None), priority, auto, accepts, prefer)
        _static.clear()
        _plans.clear()
        _impls.pop((op, name), None)


def unregister(op: str, name: Optional[str] = None) -> None:
    """Remove backend ``name`` of ``op`` (every backend, and the op, when None)."""
    with _lock:
        _check_op(op)
        if name is None:
            del _OPS[op]
        else:
            _backend(op, name)
            del _OPS[op][name]
        _static.clear()
        _plans.clear()
        for key in [k for k in _impls if k[0] == op and name in (None, k[1])]:
            del _impls[key]


def clear_cache() -> None:
    """Forget cached availability and resolutions (after changing the
    environment a backend's availability depends on, e.g. TRITON_INTERPRET)."""
    with _lock:
        _static.clear()
        _plans.clear()


# ----------------------------------------------------------------- shared predicates

def triton_available(device: torch.device, dtype: torch.dtype,
                     dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> Reason:
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


def device_type(kind: str) -> Callable[[torch.device, torch.dtype], Reason]:
    """``available=`` predicate: runs on ``kind`` tensors only."""
    def available(device: torch.device, dtype: torch.dtype) -> Reason:
        if device.type != kind:
            return f"runs on {kind.upper()} tensors, not {device.type}"
        return None
    return available


def floating(device: torch.device, dtype: torch.dtype) -> Reason:
    """``available=`` predicate: any floating dtype."""
    return None if dtype.is_floating_point else f"needs a floating dtype, got {dtype}"


# ----------------------------------------------------------------- queries

def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")


def _backend(op: str, name: str) -> _Backend:
    _check_op(op)
    if name not in _OPS[op]:
        raise ValueError(f"op {op!r} has no backend {name!r}; "
                         f"registered: {registered_backends(op)}")
    return _OPS[op][name]


def registered_backends(op: str) -> List[str]:
    """Every backend of ``op``, highest priority first."""
    _check_op(op)
    return sorted(_OPS[op], key=lambda n: -_OPS[op][n].priority)


def _static_info(b: _Backend, op: str, device: torch.device, dtype: torch.dtype
                 ) -> Tuple[Reason, bool]:
    key = (op, b.name, device.type, dtype)
    hit = _static.get(key)
    if hit is None:
        try:
            reason = b.available(device, dtype)
        except Exception as e:  # an import failure etc. is a reason, not a crash
            reason = f"{type(e).__name__}: {e}"
        auto = bool(b.auto(device, dtype)) if callable(b.auto) else bool(b.auto)
        hit = _static[key] = (reason, auto)
    return hit


def _accepts(b: _Backend, call: Call) -> Reason:
    if b.accepts is None:
        return None
    try:
        return b.accepts(call)
    except Exception as e:  # a predicate bug must not hide the backend silently
        return f"{type(e).__name__} in its accepts predicate: {e}"


def _device(device: Union[str, torch.device, None]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unavailable_reason(op: str, backend: str, device: Union[str, torch.device, None] = None,
                       dtype: Optional[torch.dtype] = None, **inputs: Any) -> Reason:
    """Why ``backend`` of ``op`` cannot run here (None: it can).

    ``device`` defaults to CUDA when present, else CPU; ``dtype`` to float32.
    Given the call's ``inputs`` (e.g. ``q=q``), shape limits are checked too.
    """
    b = _backend(op, backend)
    dev, dtype = _device(device), dtype or torch.float32
    reason = _static_info(b, op, dev, dtype)[0]
    if reason is None:
        reason = _accepts(b, Call(op, dev, dtype, inputs))
    return reason


def available_backends(op: str, device: Union[str, torch.device, None] = None,
                       dtype: Optional[torch.dtype] = None, **inputs: Any) -> List[str]:
    """Backends of ``op`` that can run here (and, given ``inputs``, on that
    call), in "auto" preference order: backends "auto" may pick by priority,
    then those selectable by name only (the Triton interpreter on CPU).
    Without ``inputs`` the first is what "auto" picks when no measured
    per-call policy applies; :func:`selected_backend` answers for a call."""
    _check_op(op)
    dev, dtype = _device(device), dtype or torch.float32
    call = Call(op, dev, dtype, inputs)
    names = []
    for n in registered_backends(op):
        b = _OPS[op][n]
        reason, auto = _static_info(b, op, dev, dtype)
        if reason is None and _accepts(b, call) is None:
            names.append((not auto, n))
    return [n for _, n in sorted(names, key=lambda x: x[0])]


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
            if b != "auto":
                _backend(op, b)
            else:
                _check_op(op)
    prev = getattr(_state, "selection", None)
    _state.selection = name
    try:
        yield
    finally:
        _state.selection = prev


# ----------------------------------------------------------------- resolution

class _Plan(NamedTuple):
    """Cached resolution of (op, selection, device type, dtype), by backend name.

    ``fixed``: the answer when it does not depend on the call.  Otherwise
    ``candidates`` are tried in order with their per-call predicates;
    ``reasons`` (why the others cannot run) go into the error raised when none
    remains.  Names and strings only: under ``torch.compile`` a plan is a
    constant that :func:`_plan_of` hands to dynamo."""
    fixed: Optional[str]
    candidates: Tuple[str, ...]
    reasons: Tuple[str, ...]
    named: bool


def _plan(op: str, selection: str, device: torch.device, dtype: torch.dtype) -> _Plan:
    if selection != "auto":
        b = _backend(op, selection)
        reason = _static_info(b, op, device, dtype)[0]
        if reason is not None:
            return _Plan(None, (), (f"{selection}: {reason}",), True)
        fixed = b.name if b.accepts is None else None
        return _Plan(fixed, (b.name,), (), True)
    cands, reasons = [], []
    for n in registered_backends(op):
        b = _OPS[op][n]
        reason, auto = _static_info(b, op, device, dtype)
        if not auto:
            continue
        if reason is not None:
            reasons.append(f"{n}: {reason}")
            continue
        cands.append(b)
        if b.accepts is None and b.prefer is None:
            break  # nothing after an unconditional candidate can be reached
    fixed = None
    if cands and cands[0].accepts is None and cands[0].prefer is None:
        fixed = cands[0].name
    return _Plan(fixed, tuple(b.name for b in cands), tuple(reasons), False)


@torch.compiler.assume_constant_result
def _plan_of(op: str, selection: str, device_type: str, dtype: torch.dtype) -> _Plan:
    """The cached plan of (op, selection, device type, dtype), made on first use.  Under
    torch.compile dynamo calls this eagerly (the availability checks may import or
    build a backend) and puts its answer into the trace as a constant."""
    key = (op, selection, device_type, dtype)
    plan = _plans.get(key)
    if plan is None:
        _check_op(op)
        plan = _plans[key] = _plan(op, selection, torch.device(device_type), dtype)
    return plan


def _select(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype,
            inputs: Mapping[str, Any]) -> str:
    selection = backend if backend not in (None, "auto") else current_backend(op)
    plan = _plan_of(op, selection, device.type, dtype)
    if plan.fixed is not None:
        return plan.fixed
    call = Call(op, device, dtype, inputs)
    reasons = list(plan.reasons)
    fallback = None
    for name in plan.candidates:
        b = _OPS[op][name]
        reason = _accepts(b, call)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
            continue
        if plan.named or b.prefer is None or b.prefer(call):
            return name
        fallback = fallback or name   # runnable, but the policy prefers another
    if fallback is not None:
        return fallback
    if plan.named:
        raise BackendUnavailableError(
            f"backend {selection!r} of op {op!r} is unavailable for {device}/{dtype}: "
            + "; ".join(r.split(": ", 1)[1] for r in reasons))
    raise BackendUnavailableError(
        f"no backend of {op!r} can run on {device} with {dtype}: " + "; ".join(reasons))


def load(op: str, name: str) -> Callable:
    """The implementation of backend ``name`` of ``op`` (its loader runs once).  Custom
    ops call this when they run, so a backend's import or build never happens in a
    traced region."""
    if torch.compiler.is_compiling():
        # traced: the loader itself (plain-PyTorch backends; a kernel backend is loaded by
        # its custom op when that runs), never a write to the cache (a cache filled inside
        # the trace would invalidate the graph at the next call)
        return _backend(op, name).impl()
    fn = _impls.get((op, name))
    if fn is None:
        fn = _impls[(op, name)] = _backend(op, name).impl()
    return fn


def resolve(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype,
            **inputs: Any) -> Callable:
    """The implementation of ``op`` for this call (``inputs``: the call's
    tensors and arguments by name, for per-call predicates)."""
    return load(op, _select(op, backend, device, dtype, inputs))


def selected_backend(op: str, backend: Optional[str] = None,
                     device: Union[str, torch.device, None] = None,
                     dtype: Optional[torch.dtype] = None, **inputs: Any) -> str:
    """Name of the backend a call with these inputs runs on (honours
    :func:`use_backend`; raises :class:`BackendUnavailableError` like the op)."""
    return _select(op, backend, _device(device), dtype or torch.float32, inputs)
