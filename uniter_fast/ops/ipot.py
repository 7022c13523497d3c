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

Small beta and offset costs: float32 IPOT needs the cost its kernel sees in
[0, IPOT_MAX_COST_OVER_BETA · beta] on the real block (else exp(-C/beta)
under- or overflows and the plan is NaN), and rows whose entries all lie far
above 0 make the scalings huge and the kernels' intermediate products (δ ⊙ Q
before sigma) underflow.  A cost whose real entries lie in
[0, IPOT_ROW_SHIFT_SLACK · beta] (UNITER's: [0, 2] at beta = 0.5) goes to the
backend unchanged.  Otherwise the op subtracts each column's minimum over the
real rows (the plan is exactly unchanged: delta absorbs a column factor of
exp(-C/beta)) and then each row's remaining minimum less
IPOT_ROW_SHIFT_SLACK · beta (a row factor is absorbed by sigma from the first
sigma update on; before it, in the first delta, such a row weighs at most
exp(-slack) of a column's total, shifted or not), see :func:`kernel_cost`;
the distance is then trace(C·T) of the original cost, from the plan.  A cost
that still spans more than IPOT_MAX_COST_OVER_BETA · beta after the shifts
cannot be computed in float32: ValueError naming beta and the smallest beta
that would do.  Deciding this reads two scalars (a host sync on a GPU).
Within that limit float32 IPOT can still lose entries of the plan on some
costs at large span / beta (above ~12 in the tests; an entry whose exact value
dips below float32's range for a few iterations cannot come back, Q = A ⊙ T):
where a whole row or column vanishes the result would be NaN, and the ops raise
a ValueError saying so instead (:func:`check_finite`).

Backends: ``cuda`` (csrc/ipot_cuda.cu, one block per example), ``triton``
(kernels/ipot_triton.py, one program per example; on CPU only under
TRITON_INTERPRET=1 and never picked by "auto" there), ``cpp``
(csrc/ipot_cpu.cpp, OpenMP over examples: the CPU fast path),
``reference`` (plain PyTorch).  "auto" takes the first available in that order.
"""
import math
from typing import Optional

import torch

from ..constants import (
    IPOT_BETA,
    IPOT_INNER_ITERATIONS,
    IPOT_ITERATIONS,
    IPOT_MAX_COST_OVER_BETA,
    IPOT_ROW_SHIFT_SLACK,
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
    if not (beta > 0 and math.isfinite(beta)):
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


def shifted_cost(C, tp, ip, beta):
    """(C', span): the cost with each column's minimum over the real rows and then
    each row's remaining minimum less IPOT_ROW_SHIFT_SLACK · beta (not below 0)
    subtracted, float32, 0 on padded entries; span [B] = the largest finite real
    entry of C' per example (0 for an empty example).  Computed in float64 for a
    float64 C, else in float32 (a difference of two float32 within a factor of two
    of each other is exact).  The IPOT plan of C' is the plan of C: see the module
    docstring."""
    B = C.size(0)
    work = C.detach()
    work = work if work.dtype == torch.float64 else work.float()
    if work.numel() == 0:
        return work.float(), work.new_zeros(B, dtype=torch.float32)
    pad = tp[:, :, None] | ip[:, None, :]
    inf = float("inf")
    col = work.masked_fill(pad, inf).amin(1, keepdim=True)               # [B, 1, N]
    work = work - torch.where(torch.isfinite(col), col, torch.zeros_like(col))
    row = work.masked_fill(pad, inf).amin(2, keepdim=True)               # [B, M, 1]
    row = torch.where(torch.isfinite(row), row, torch.zeros_like(row))
    work = (work - (row - IPOT_ROW_SHIFT_SLACK * beta).clamp(min=0)).masked_fill(pad, 0)
    finite = torch.where(torch.isfinite(work), work, torch.zeros_like(work))
    return work.float(), finite.amax(dim=(1, 2)).float()


def kernel_cost(C, tp, ip, beta):
    """(cost the backend gets, whether it is C itself): ``C.detach()`` when C's
    real entries lie in [0, IPOT_ROW_SHIFT_SLACK · beta] (float32 IPOT runs on it
    as is), else :func:`shifted_cost`'s C'.  ValueError when even C' spans
    more than IPOT_MAX_COST_OVER_BETA · beta (beta too small for this cost)."""
    C = C.detach()
    if C.numel() == 0:
        return C, True
    as_is = IPOT_ROW_SHIFT_SLACK * beta
    lo, hi = torch.aminmax(C)
    if bool((lo >= 0) & (hi <= as_is)):
        return C, True
    lo, hi = torch.aminmax(C.masked_fill(tp[:, :, None] | ip[:, None, :], 0))
    if bool((lo >= 0) & (hi <= as_is)):   # only padded entries were out of range
        return C, True
    limit = IPOT_MAX_COST_OVER_BETA * beta
    cost, span = shifted_cost(C, tp, ip, beta)
    worst = int(span.argmax())
    top = float(span[worst])
    if top > limit:
        raise ValueError(
            f"beta={beta:g} is too small for this cost: after subtracting each column's and "
            f"row's minimum (which leaves the plan unchanged) the real entries of example "
            f"{worst} still span {top:.6g}, and float32 IPOT needs span / beta <= "
            f"{IPOT_MAX_COST_OVER_BETA:g} (exp(-C/beta) and the scalings must stay normal "
            f"float32 numbers); this cost needs beta >= {top / IPOT_MAX_COST_OVER_BETA:.6g}")
    return cost, False


def check_finite(result, beta, inputs):
    """ValueError when IPOT returned a non-finite plan / distance from finite
    inputs (float32 lost a whole row or column of the plan); one reduction
    over ``result``, and ``inputs()`` (the tensors that must be finite) is
    called only when it failed."""
    if result.numel() == 0 or bool(torch.isfinite(result).all()):
        return result
    if all(bool(torch.isfinite(t).all()) for t in inputs()):
        raise ValueError(
            f"IPOT at beta={beta:g} gave a non-finite result from a finite input: in float32 "
            f"a row or column of the plan fell below float32's range during the iterations "
            f"(its exact entries dip that low for this cost at this beta); use a larger beta")
    return result


# ----------------------------------------------------------------- backends

def _reference_plan():
    return _ref.ipot


def _reference_distance():
    return _ref.ipot_distance


class _FusedDistance(torch.autograd.Function):
    """trace(C·T) from a kernel that returns (T, distance) in one pass.

    Forward runs the kernel on the detached cost; backward is the reference's
    gradient, d distance / d C = Tᵀ (the plan is a constant)."""

    @staticmethod
    def forward(ctx, C, txt_pad, img_pad, beta, iteration, k, kernel):
        T, dist = kernel(C.detach(), txt_pad, img_pad, beta, iteration, k, True)
        ctx.save_for_backward(T)
        ctx.cost_dtype = C.dtype
        return dist

    @staticmethod
    def backward(ctx, grad):
        (T,) = ctx.saved_tensors
        grad_C = (grad[:, None, None] * T.transpose(1, 2)).to(ctx.cost_dtype)
        return grad_C, None, None, None, None, None, None


def fused_distance(kernel):
    """``ipot_distance`` backend from ``kernel(C, tp, ip, beta, it, k, with_plan)
    -> (T or None, distance)``: without a gradient the plan is not written."""
    def distance(C, txt_pad, img_pad, beta, iteration, k):
        if not (C.requires_grad and torch.is_grad_enabled()):
            return kernel(C.detach(), txt_pad, img_pad, beta, iteration, k, False)[1]
        return _FusedDistance.apply(C, txt_pad, img_pad, beta, iteration, k, kernel)
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
        return fused_distance(_ext_fn(kind, f"ipot_distance_{kind}"))
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
    return fused_distance(ipot_triton.ipot_distance)


for _op, _ref_impl, _ext_impl, _tri_impl in (
        (OP, _reference_plan, _ext_plan, _triton_plan),
        (DIST_OP, _reference_distance, _ext_distance, _triton_distance)):
    _registry.register(_op, "reference", _ref_impl, priority=0)
    _registry.register(_op, "cpp", _ext_impl("cpu"), available=_ext_available("cpu"), priority=10)
    _registry.register(_op, "triton", _tri_impl, available=_triton_available, priority=20,
                       auto=_registry.on_cuda)
    _registry.register(_op, "cuda", _ext_impl("cuda"), available=_ext_available("cuda"),
                       priority=30)


# ----------------------------------------------------------------- public ops

def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
         k: int = IPOT_INNER_ITERATIONS, *, backend: Optional[str] = None) -> torch.Tensor:
    """IPOT plan for cost C [B, M, N]; pads are 1 = padded. Returns [B, N, M] float32."""
    tp, ip, beta, iteration, k = check_inputs(C, txt_pad, img_pad, beta, iteration, k)
    fn = _registry.resolve(OP, backend, C.device, C.dtype)
    cost = kernel_cost(C, tp, ip, beta)[0]
    return check_finite(fn(cost, tp, ip, beta, iteration, k), beta,
                        lambda: [cost.masked_fill(tp[:, :, None] | ip[:, None, :], 0)])


def distance_unchecked(C, tp, ip, beta, iteration, k, backend=None):
    """:func:`ipot_distance` on inputs that already meet its contract."""
    return _registry.resolve(DIST_OP, backend, C.device, C.dtype)(C, tp, ip, beta, iteration, k)


def ipot_distance(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                  beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                  k: int = IPOT_INNER_ITERATIONS, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """trace(C·T) per example, [B] float32, T the IPOT plan of the detached C.

    Same contract as :func:`uniter_fast.reference.ipot_distance`: gradient
    through C only, padded entries of a finite C do not contribute.  Small beta
    and offset costs: see the module docstring (the distance is always C's)."""
    tp, ip, beta, iteration, k = check_inputs(C, txt_pad, img_pad, beta, iteration, k)
    cost, unchanged = kernel_cost(C, tp, ip, beta)
    if unchanged:
        return check_finite(distance_unchecked(C, tp, ip, beta, iteration, k, backend), beta,
                            lambda: [cost.masked_fill(tp[:, :, None] | ip[:, None, :], 0)])
    # the plan of the shifted cost on the backend ipot_distance would run, the trace
    # of the original cost (gradient Tᵀ by autograd)
    name = _registry.selected_backend(DIST_OP, backend, C.device, C.dtype)
    T = _registry.resolve(OP, name, C.device, C.dtype)(cost, tp, ip, beta, iteration, k)
    check_finite(T, beta, lambda: [cost])
    real = C.float().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    return (real * T.transpose(1, 2)).sum(dim=(1, 2))
