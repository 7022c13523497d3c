"""Public IPOT / WRA ops.

* ``ipot(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1, *, backend="auto")``:
  the transport plan [B, N, M] (float32, no gradient).
* ``ipot_distance(C, ...)``: trace(C·T) per example, [B] float32, gradient
  through the cost only (d distance / d C = Tᵀ).  Its own op: the ``cpp``,
  ``triton`` and ``cuda`` backends compute the distance in the kernel's last
  pass (and skip writing the plan when no gradient is needed), ``reference``
  takes it from the reference plan.

The WRA distance from the embeddings, ``optimal_transport_dist``, is in
:mod:`uniter_fast.ops.wra`.

Input contract (checked here once): C [B, M, N] floating on one device with
the pads; txt_pad [B, M] / img_pad [B, N] bool or integer masks, 1 = padded,
any pattern; beta finite > 0; iteration, k >= 1.  Backends receive the
detached cost (``ipot``) or the cost (``ipot_distance``), the pads as bool
tensors and ``beta`` / ``iteration`` / ``k`` as float / int / int.

Small beta and offset costs: the float32 kernels (and UNITER's float32 IPOT)
lose plan entries when C/beta spans too much: an entry whose exact value falls
below float32's range in some iteration is 0 from then on (Q = A ⊙ T) although
the exact iteration may bring it back, and the plan comes out finite but wrong
(or NaN once a whole row or column is gone).  So the ops hand a backend only a
cost that spans at most IPOT_FAST_MAX_COST_OVER_BETA · beta (6; UNITER's cosine
cost at beta = 0.5 spans up to 4) in at most IPOT_FAST_MAX_ITERATIONS iterations,
the range where every float32 backend matched a float64 transcription on every
cost tried (random, cosine, tied and degenerate costs at many shapes; failures
began at 8 · beta with 50 iterations and at 5 · beta with 150; see
tests/test_ipot_small_beta.py).  A cost whose real entries lie in
[0, 6 · beta] goes to the backend unchanged; any other first has each column's
minimum over the real rows subtracted (the plan is exactly unchanged: delta
absorbs a column factor of exp(-C/beta)), and the examples where that spans at
most 6 · beta go to the backend.  Every other example (a smaller beta, rows at
different offsets, more iterations) is computed by
:func:`uniter_fast.reference.ot.ipot_log_domain`:
the same updates in the log domain in float64, in plain PyTorch on C's device,
whichever backend was asked for; it is exact for any beta > 0 (an entry is kept
as its logarithm, so none is lost) and slower.  The distance is
then trace(C·T) of the original cost with gradient Tᵀ.  Deciding reads two
scalars (a host sync on a GPU); it happens inside the custom ops
``uniter_fast::ipot`` / ``uniter_fast::ipot_distance`` (below), so under
torch.compile it is part of an opaque op, never a graph break.  The model's WRA
never routes (its cosine cost at beta >= 1/3 is always in range, see
:mod:`uniter_fast.ops.wra`).  A non-finite result from a finite input would
be a bug: it raises a ValueError (:func:`check_finite`; on a GPU a device-side
assertion, no host sync).

Backends: ``cuda`` (csrc/ipot_cuda.cu, one block per example), ``triton``
(kernels/ipot_triton.py, one program per example; on CPU only under
TRITON_INTERPRET=1 and never picked by "auto" there), ``cpp``
(csrc/ipot_cpu.cpp, OpenMP over examples: the CPU fast path),
``reference`` (plain PyTorch).  "auto" takes the first available in that order.
"""
import math
from typing import Optional, Tuple

import torch

from ..constants import (
    IPOT_BETA,
    IPOT_FAST_MAX_COST_OVER_BETA,
    IPOT_FAST_MAX_ITERATIONS,
    IPOT_INNER_ITERATIONS,
    IPOT_ITERATIONS,
)
from ..reference import ot as _ref
from . import _registry

OP = "ipot"
DIST_OP = "ipot_distance"
PAD_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------- input contract

def as_pad(pad, name: str, shape, device) -> torch.Tensor:
    """A padding mask (1 = padded) of ``shape`` on ``device`` as a bool tensor."""
    if not isinstance(pad, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(pad).__name__}")
    if pad.dtype not in PAD_DTYPES:
        raise ValueError(f"{name} must be a bool/integer padding mask (1 = padded), got {pad.dtype}")
    if tuple(pad.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(pad.shape)} != {list(shape)}")
    if pad.device != device:
        raise ValueError(f"{name} is on {pad.device}, the cost/embeddings on {device}")
    return pad if pad.dtype == torch.bool else pad.bool()


def check_params(beta, iteration, k):
    """(beta, iteration, k) as (float, int, int); ValueError naming a bad one."""
    beta = float(beta)
    if not 0 < beta < math.inf:      # (not math.isfinite: traceable when beta is symbolic)
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if int(iteration) < 1 or int(k) < 1:
        raise ValueError(f"iteration and k must be >= 1, got iteration={iteration}, k={k}")
    return beta, int(iteration), int(k)


def check_inputs(C, txt_pad, img_pad, beta, iteration, k):
    """The contract of ``ipot`` / ``ipot_distance``; returns the normalised
    (txt_pad, img_pad, beta, iteration, k)."""
    if not isinstance(C, torch.Tensor) or C.dim() != 3:
        raise ValueError("cost C must be a [B, M, N] tensor; got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}")
    if not C.dtype.is_floating_point:
        raise ValueError(f"cost C must be floating, got {C.dtype}")
    tp = as_pad(txt_pad, "txt_pad", C.shape[:2], C.device)
    ip = as_pad(img_pad, "img_pad", (C.size(0), C.size(2)), C.device)
    return (tp, ip) + check_params(beta, iteration, k)


def column_shifted(C, tp, ip):
    """(C', span): C with each column's minimum over the real rows subtracted,
    float32, 0 on padded entries, and span [B] = the largest real entry of C' per
    example (0 for an empty one; inf or nan where C has such entries).  Computed in
    float64 for a float64 C, else in float32; where span is small against the
    entries this is exact (a difference of two float32 within a factor of two of
    each other is).  The IPOT plan of C' is the plan of C."""
    B = C.size(0)
    work = C.detach()
    work = work if work.dtype == torch.float64 else work.float()
    if work.numel() == 0:
        return work.float(), work.new_zeros(B, dtype=torch.float32)
    pad = tp[:, :, None] | ip[:, None, :]
    col = work.masked_fill(pad, float("inf")).amin(1, keepdim=True)   # [B, 1, N]
    work = (work - torch.where(torch.isfinite(col), col, torch.zeros_like(col))).masked_fill(pad, 0)
    return work.float(), work.amax(dim=(1, 2)).float()


def fast_cost(C, tp, ip, beta, iteration):
    """(cost, unchanged, fits): which examples the float32 kernels may compute.

    ``cost`` is what to hand them: ``C.detach()`` (``unchanged``) when the batch's
    real entries lie in [0, IPOT_FAST_MAX_COST_OVER_BETA · beta], else
    :func:`column_shifted`'s C'.  ``fits`` is None when every example goes to the
    kernels, else a bool [B] naming those that do (C' spans at most that much);
    the others, and every example beyond IPOT_FAST_MAX_ITERATIONS iterations (then
    ``cost`` is None), are computed in the log domain (see the module docstring)."""
    C = C.detach()
    if C.numel() == 0:
        return C, True, None
    if iteration > IPOT_FAST_MAX_ITERATIONS:
        return None, False, torch.zeros(C.size(0), dtype=torch.bool, device=C.device)
    limit = IPOT_FAST_MAX_COST_OVER_BETA * beta
    lo, hi = torch.aminmax(C)
    if bool((lo >= 0) & (hi <= limit)):
        return C, True, None
    lo, hi = torch.aminmax(C.masked_fill(tp[:, :, None] | ip[:, None, :], 0))
    if bool((lo >= 0) & (hi <= limit)):   # only padded entries were out of range
        return C, True, None
    cost, span = column_shifted(C, tp, ip)
    fits = span <= limit
    return cost, False, (None if bool(fits.all()) else fits)


def routed_plan(C, tp, ip, beta, iteration, k, plan_fn, route=None):
    """The plan [B, N, M]: ``plan_fn`` (a backend's ``ipot``) on the examples that fit
    the float32 kernels, :func:`uniter_fast.reference.ot.ipot_log_domain` on the
    rest; ``route``: :func:`fast_cost`'s answer when already computed."""
    cost, _, fits = route or fast_cost(C, tp, ip, beta, iteration)
    if fits is None:
        return check_finite(plan_fn(cost, tp, ip, beta, iteration, k), beta,
                            lambda: [cost.masked_fill(tp[:, :, None] | ip[:, None, :], 0)])
    slow = (~fits).nonzero().flatten()
    fast = fits.nonzero().flatten()
    if fast.numel() == 0:
        return _ref.ipot_log_domain(C, tp, ip, beta, iteration, k)
    out = torch.empty(C.size(0), C.size(2), C.size(1), dtype=torch.float32, device=C.device)
    out[slow] = _ref.ipot_log_domain(C[slow], tp[slow], ip[slow], beta, iteration, k)
    sub = cost[fast]
    out[fast] = check_finite(plan_fn(sub, tp[fast], ip[fast], beta, iteration, k), beta,
                             lambda: [sub.masked_fill(tp[fast][:, :, None] | ip[fast][:, None, :],
                                                      0)])
    return out


def check_finite(result, beta, inputs):
    """ValueError when IPOT returned a non-finite plan / distance from finite
    inputs (which the routing above should make impossible); one reduction
    over ``result``, and ``inputs()`` (the tensors that must be finite) is
    called only when it failed.  Runs inside the custom ops (never in a traced
    region); on a GPU it is a device-side assertion (no host sync): the same
    condition, raised when the stream reaches it."""
    if result.numel() == 0:
        return result
    msg = (f"IPOT at beta={beta:g} gave a non-finite result from a finite input "
           f"(a bug: please report the cost, pads, beta and backend)")
    if result.device.type == "cuda":
        ok = torch.isfinite(result).all()
        for t in inputs():
            ok = ok | ~torch.isfinite(t).all()
        torch._assert_async(ok, msg)
        return result
    if bool(torch.isfinite(result).all()):
        return result
    if all(bool(torch.isfinite(t).all()) for t in inputs()):
        raise ValueError(msg)
    return result


# ----------------------------------------------------------------- backends

def _reference_plan():
    return _ref.ipot


def _reference_distance():
    def distance(C, txt_pad, img_pad, beta, iteration, k, with_plan):
        T = _ref.ipot(C, txt_pad, img_pad, beta, iteration, k)
        return T, (C.float() * T.transpose(1, 2)).sum(dim=(1, 2))
    return distance


# cpp (csrc/ipot_cpu.cpp) and cuda (csrc/ipot_cuda.cu): the C++ extension
EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _ext_available(kind: str):
    on_device = _registry.device_type(kind)

    def available(device, dtype):
        reason = on_device(device, dtype)
        if reason is None and dtype not in EXT_DTYPES:
            reason = f"needs a float16/bfloat16/float32/float64 cost, got {dtype}"
        if reason is None:
            from .. import _ext
            reason = getattr(_ext, f"{kind}_unavailable_reason")()
        return reason
    return available


def _ext_fn(kind: str, name: str):
    from .. import _ext
    return getattr(getattr(_ext, f"{kind}_module")(), name)


def _ext_plan(kind: str):
    def load():
        fn = _ext_fn(kind, f"ipot_{kind}")
        return lambda C, tp, ip, beta, it, k: fn(C.detach(), tp, ip, beta, it, k)
    return load


def _ext_distance(kind: str):
    def load():
        return _ext_fn(kind, f"ipot_distance_{kind}")
    return load


# triton (kernels/ipot_triton.py)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available(device, dtype):
    return _registry.triton_available(device, dtype, TRITON_DTYPES)


def _triton_plan():
    from uniter_fast.kernels import ipot_triton
    return ipot_triton.ipot


def _triton_distance():
    from uniter_fast.kernels import ipot_triton
    return ipot_triton.ipot_distance


for _op, _ref_impl, _ext_impl, _tri_impl in (
        (OP, _reference_plan, _ext_plan, _triton_plan),
        (DIST_OP, _reference_distance, _ext_distance, _triton_distance)):
    _registry.register(_op, "reference", _ref_impl, priority=0)
    _registry.register(_op, "cpp", _ext_impl("cpu"), available=_ext_available("cpu"), priority=10)
    _registry.register(_op, "triton", _tri_impl, available=_triton_available, priority=20,
                       auto=_registry.on_cuda)
    _registry.register(_op, "cuda", _ext_impl("cuda"), available=_ext_available("cuda"),
                       priority=30)


# ----------------------------------------------------------------- custom ops
#
# Every IPOT backend runs inside one of two registered custom ops (torch.library), so
# torch.compile sees one opaque node with a fake (meta) implementation and the
# autograd formula below instead of tracing into the routing (which reads the cost's
# range: data-dependent) or into the C++/CUDA/Triton launchers.  The backend is picked
# by the registry in the Python wrapper (at trace time under torch.compile) and passed
# by name; the op loads it when it runs (``_registry.load``).


@torch.library.custom_op("uniter_fast::ipot", mutates_args=())
def _ipot_op(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float,
             iteration: int, k: int, backend: str) -> torch.Tensor:
    """The plan [B, N, M] float32 on ``backend`` with the routing of :func:`routed_plan`."""
    return routed_plan(C, txt_pad, img_pad, beta, iteration, k,
                       _registry.load(OP, backend)).contiguous()


@_ipot_op.register_fake
def _ipot_fake(C, txt_pad, img_pad, beta, iteration, k, backend):
    return C.new_empty((C.size(0), C.size(2), C.size(1)), dtype=torch.float32)


@torch.library.custom_op("uniter_fast::ipot_distance", mutates_args=())
def _distance_op(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float,
                 iteration: int, k: int, backend: str, with_plan: bool, route: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(plan [B, N, M] float32, or an empty tensor without ``with_plan``; trace(C·T) [B]
    float32).  ``route``: decide per example between ``backend`` and the float64 log
    domain (:func:`fast_cost`); without it the cost is known to be in the kernels'
    range (the WRA's cosine cost at beta >= WRA_FAST_MIN_BETA) and goes to ``backend``
    as it is."""
    routing = fast_cost(C, txt_pad, img_pad, beta, iteration) if route else None
    if routing is None or routing[1]:   # the backend's fused plan + trace
        T, dist = _registry.load(DIST_OP, backend)(C, txt_pad, img_pad, beta, iteration, k,
                                                   with_plan)
        if route:
            check_finite(dist, beta,
                         lambda: [C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)])
    else:
        # the plan (on the backend where the examples fit), then the trace of the original
        # cost over the real block
        T = routed_plan(C, txt_pad, img_pad, beta, iteration, k, _registry.load(OP, backend),
                        routing).contiguous()
        real = C.float().masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
        dist = (real * T.transpose(1, 2)).sum(dim=(1, 2))
    if not with_plan or T is None:
        T = dist.new_empty(0)
    return T, dist


@_distance_op.register_fake
def _distance_fake(C, txt_pad, img_pad, beta, iteration, k, backend, with_plan, route):
    b, m, n = C.shape
    return (C.new_empty((b, n, m) if with_plan else (0,), dtype=torch.float32),
            C.new_empty((b,), dtype=torch.float32))


def _distance_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.cost_dtype = inputs[0].dtype
    ctx.with_plan = inputs[7]
    ctx.mark_non_differentiable(output[0])


def _distance_backward(ctx, grad_plan, grad_dist):
    """d distance / d C = Tᵀ (the plan is a constant, as in UNITER)."""
    (T,) = ctx.saved_tensors
    if not ctx.with_plan:
        raise RuntimeError("uniter_fast::ipot_distance ran without its plan (with_plan=False) "
                           "and cannot be differentiated")
    grad_C = (grad_dist[:, None, None] * T.transpose(1, 2)).to(ctx.cost_dtype)
    return grad_C, None, None, None, None, None, None, None, None


_distance_op.register_autograd(_distance_backward, setup_context=_distance_setup)


def _distance(C, tp, ip, beta, iteration, k, backend, route):
    with_plan = torch.is_grad_enabled() and C.requires_grad
    return torch.ops.uniter_fast.ipot_distance(C, tp, ip, beta, iteration, k, backend,
                                               with_plan, route)[1]


# ----------------------------------------------------------------- public ops

def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
         k: int = IPOT_INNER_ITERATIONS, *, backend: Optional[str] = None) -> torch.Tensor:
    """IPOT plan for cost C [B, M, N]; pads are 1 = padded. Returns [B, N, M] float32.
    Small beta and offset costs: see the module docstring."""
    tp, ip, beta, iteration, k = check_inputs(C, txt_pad, img_pad, beta, iteration, k)
    name = _registry.selected_backend(OP, backend, C.device, C.dtype)
    return torch.ops.uniter_fast.ipot(C.detach(), tp, ip, beta, iteration, k, name)


def distance_on_backend(C, tp, ip, beta, iteration, k, backend=None):
    """The ``ipot_distance`` backend on a cost known to be in its range (see
    :func:`fast_cost`), inputs meeting the contract; no routing, no host sync."""
    name = _registry.selected_backend(DIST_OP, backend, C.device, C.dtype)
    return _distance(C, tp, ip, beta, iteration, k, name, False)


def distance_unchecked(C, tp, ip, beta, iteration, k, backend=None):
    """:func:`ipot_distance` on inputs that already meet its contract."""
    name = _registry.selected_backend(DIST_OP, backend, C.device, C.dtype)
    return _distance(C, tp, ip, beta, iteration, k, name, True)


def ipot_distance(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                  beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                  k: int = IPOT_INNER_ITERATIONS, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """trace(C·T) per example, [B] float32, T the IPOT plan of the detached C.

    Same contract as :func:`uniter_fast.reference.ipot_distance`: gradient
    through C only, padded entries of a finite C do not contribute.  Small beta
    and offset costs: see the module docstring (the distance is always C's)."""
    tp, ip, beta, iteration, k = check_inputs(C, txt_pad, img_pad, beta, iteration, k)
    return distance_unchecked(C, tp, ip, beta, iteration, k, backend)
