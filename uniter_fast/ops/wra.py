"""Public WRA op: ``optimal_transport_dist(txt_emb, img_emb, txt_pad, img_pad,
beta=0.5, iteration=50, k=1, *, backend="auto")``, UNITER's word-region
alignment distance [B] (float32) from the embeddings, what the model calls.

Input contract (checked here once): txt_emb [B, M, D] and img_emb [B, N, D]
floating on one device (computed in float32), txt_pad [B, M] / img_pad
[B, N] bool or integer masks (1 = padded, any pattern), beta finite > 0,
iteration and k >= 1.  The cost 1 - cos spans up to 2, so from beta >=
WRA_FAST_MIN_BETA = 1/3 (and up to IPOT_FAST_MAX_ITERATIONS iterations) it is
always in the float32 kernels' range and the backends below run; at a smaller
beta the cosine cost is computed first (the cost op) and goes through
``ipot_distance``'s routing, which computes it in the log domain in float64
where float32 IPOT would lose plan entries (see :mod:`uniter_fast.ops.ipot`).
An empty text or image side gives distance 0.  The
gradient flows through the cosine cost only (the plan is a constant), as in
UNITER.  Backends receive float32 embeddings and bool pads:
``fn(txt_emb, img_emb, txt_pad, img_pad, beta, iteration, k)``.

Backends:

* ``cpp`` (CPU, csrc/wra_cpu_kernel.h): one OpenMP task per example does the
  cosine cost of the real block only (norms and a register-tiled GEMM on the
  unpadded rows, in cache), IPOT and trace(C·T); the backward is a second
  pass of the same kind (dx = g (p ⊙ x − P y), P = T ⊙ r_x r_yᵀ).  Padded rows
  are never read, no [B, M, N] cost and no normalised copies exist.
* ``cuda`` / ``triton`` (GPU): the cost op (scaled matmul, no normalised
  copies), then ``ipot_distance`` on that backend (trace in the kernel).
* ``torch``: the cost op, then ``ipot_distance`` on "auto" (anywhere).
* ``reference``: :func:`uniter_fast.reference.optimal_transport_dist`.
"""
from typing import Optional

import torch

from ..constants import (
    COSINE_EPS,
    IPOT_BETA,
    IPOT_FAST_MAX_ITERATIONS,
    IPOT_INNER_ITERATIONS,
    IPOT_ITERATIONS,
    WRA_FAST_MIN_BETA,
)
from ..reference import ot as _ref
from . import _registry
from .cost import check_embeddings, cosine_cost_unchecked
from .ipot import (
    DIST_OP,
    _ext_available,
    _triton_available,
    check_finite,
    check_params,
    distance_on_backend,
    distance_unchecked,
)

WRA_OP = "optimal_transport_dist"


def _reference():
    return _ref.optimal_transport_dist


def _composed(distance_backend: Optional[str]):
    """The cost op on "auto", then ``ipot_distance`` on ``distance_backend``."""
    def load():
        def wra(x, y, tp, ip, beta, iteration, k):
            cost = cosine_cost_unchecked(x, y, tp, ip, COSINE_EPS)
            return distance_on_backend(cost, tp, ip, beta, iteration, k, distance_backend)
        return wra
    return load


class _FusedWRA(torch.autograd.Function):
    """The C++ kernel's distances; backward by its second pass."""

    @staticmethod
    def forward(ctx, x, y, tp, ip, beta, iteration, k, mod):
        dist, P, px, py = mod.wra_forward_cpu(x, y, tp, ip, beta, iteration, k, COSINE_EPS, True)
        ctx.save_for_backward(x, y, tp, ip, P, px, py)
        ctx.mod = mod
        return dist

    @staticmethod
    def backward(ctx, grad):
        x, y, tp, ip, P, px, py = ctx.saved_tensors
        dx, dy = ctx.mod.wra_backward_cpu(grad.contiguous(), x, y, tp, ip, P, px, py,
                                          ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dy, None, None, None, None, None, None


def _cpp_available(device, dtype):
    reason = _ext_available("cpu")(device, dtype)
    if reason is None:
        from .. import _ext
        if not hasattr(_ext.cpu_module(), "wra_forward_cpu"):
            reason = ("the C++ extension was built from older sources (no wra_forward_cpu); "
                      "rebuild it: pip install --no-build-isolation -e .")
    return reason


def _cpp():
    from .. import _ext
    mod = _ext.cpu_module()

    def wra(x, y, tp, ip, beta, iteration, k):
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            return _FusedWRA.apply(x, y, tp, ip, beta, iteration, k, mod)
        return mod.wra_forward_cpu(x, y, tp, ip, beta, iteration, k, COSINE_EPS, False)[0]
    return wra


_registry.register(WRA_OP, "reference", _reference, priority=0)
_registry.register(WRA_OP, "torch", _composed(None), priority=5)
_registry.register(WRA_OP, "cpp", _cpp, available=_cpp_available, priority=10)
_registry.register(WRA_OP, "triton", _composed("triton"), available=_triton_available,
                   priority=20, auto=_registry.on_cuda)
_registry.register(WRA_OP, "cuda", _composed("cuda"), available=_ext_available("cuda"),
                   priority=30)


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor,
                           txt_pad: torch.Tensor, img_pad: torch.Tensor,
                           beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                           k: int = IPOT_INNER_ITERATIONS, *,
                           backend: Optional[str] = None) -> torch.Tensor:
    """UNITER's WRA distance [B] (float32) from the embeddings (see the module
    docstring); ``backend``: "auto" (default; honours :func:`use_backend`),
    "cpp", "cuda", "triton", "torch", "reference"."""
    tp, ip = check_embeddings(txt_emb, img_emb, txt_pad, img_pad)
    if tp is None or ip is None:
        raise ValueError("txt_pad and img_pad are required (1 = padded; all zeros for none)")
    beta, iteration, k = check_params(beta, iteration, k)
    fn = _registry.resolve(WRA_OP, backend, txt_emb.device, torch.float32)
    x, y = txt_emb.float(), img_emb.float()
    if beta >= WRA_FAST_MIN_BETA and iteration <= IPOT_FAST_MAX_ITERATIONS:
        dist = fn(x, y, tp, ip, beta, iteration, k)
    else:   # the cost op, then ipot_distance's routing (float64 log domain where needed)
        name = _registry.selected_backend(WRA_OP, backend, txt_emb.device, torch.float32)
        cost = cosine_cost_unchecked(x, y, tp, ip, COSINE_EPS)
        dist = distance_unchecked(cost, tp, ip, beta, iteration, k,
                                  name if name in _registry.registered_backends(DIST_OP) else None)
    return check_finite(dist, beta, lambda: [x.masked_fill(tp[:, :, None], 0),
                                             y.masked_fill(ip[:, :, None], 0)])
