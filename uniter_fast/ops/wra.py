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

torch.compile: the ``cpp`` kernel is the custom op ``uniter_fast::wra_cpp`` (backward
``uniter_fast::wra_cpp_backward``), the composed backends run the cost op (plain
PyTorch, traced) and the custom op ``uniter_fast::ipot_distance``; the reference is
plain PyTorch.  The finiteness check of every backend is the custom op
``uniter_fast::wra_check_finite`` (identity on the distances), so no device scalar is
read in traced code.
"""
from typing import Optional, Tuple

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


# ----------------------------------------------------------------- custom ops
#
# The C++ kernel (forward and backward) and the finiteness check are registered custom
# ops: torch.compile sees opaque nodes with fake implementations and the autograd
# formula below; the extension is loaded when the op runs, never in a traced region.


def _cpu_module():
    from .. import _ext
    return _ext.cpu_module()


@torch.library.custom_op("uniter_fast::wra_cpp", mutates_args=())
def _wra_cpp_op(x: torch.Tensor, y: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                beta: float, iteration: int, k: int, with_grad: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distances [B], and with ``with_grad`` what the backward pass reads: P [B, M, N],
    px [B, M], py [B, N]; empty tensors without it), float32 embeddings, bool pads."""
    dist, P, px, py = _cpu_module().wra_forward_cpu(x, y, txt_pad, img_pad, beta, iteration, k,
                                                    COSINE_EPS, with_grad)
    if not with_grad:
        P, px, py = (dist.new_empty(0) for _ in range(3))
    return dist, P, px, py


@_wra_cpp_op.register_fake
def _wra_cpp_fake(x, y, txt_pad, img_pad, beta, iteration, k, with_grad):
    b, m, n = x.size(0), x.size(1), y.size(1)
    f32 = dict(dtype=torch.float32)
    if not with_grad:
        return (x.new_empty((b,), **f32),) + tuple(x.new_empty((0,), **f32) for _ in range(3))
    return (x.new_empty((b,), **f32), x.new_empty((b, m, n), **f32), x.new_empty((b, m), **f32),
            x.new_empty((b, n), **f32))


@torch.library.custom_op("uniter_fast::wra_cpp_backward", mutates_args=())
def _wra_cpp_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         txt_pad: torch.Tensor, img_pad: torch.Tensor, P: torch.Tensor,
                         px: torch.Tensor, py: torch.Tensor, need_dx: bool, need_dy: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d txt_emb, d img_emb) by the kernel's second pass (empty where not needed)."""
    dx, dy = _cpu_module().wra_backward_cpu(grad.contiguous(), x, y, txt_pad, img_pad, P, px, py,
                                            need_dx, need_dy)
    return (dx if dx is not None else x.new_empty(0)), (dy if dy is not None else y.new_empty(0))


@_wra_cpp_backward_op.register_fake
def _wra_cpp_backward_fake(grad, x, y, txt_pad, img_pad, P, px, py, need_dx, need_dy):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx
            else x.new_empty(0),
            torch.empty_like(y, memory_format=torch.contiguous_format) if need_dy
            else y.new_empty(0))


def _wra_cpp_setup(ctx, inputs, output):
    x, y, tp, ip = inputs[:4]
    _, P, px, py = output
    ctx.save_for_backward(x, y, tp, ip, P, px, py)
    ctx.mark_non_differentiable(P, px, py)


def _wra_cpp_backward(ctx, grad, *_):
    x, y, tp, ip, P, px, py = ctx.saved_tensors
    need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dy = torch.ops.uniter_fast.wra_cpp_backward(grad, x, y, tp, ip, P, px, py, need_dx,
                                                    need_dy)
    return (dx if need_dx else None), (dy if need_dy else None), None, None, None, None, None, None


_wra_cpp_op.register_autograd(_wra_cpp_backward, setup_context=_wra_cpp_setup)


def _cpp_wra(x, y, tp, ip, beta, iteration, k):
    with_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    return torch.ops.uniter_fast.wra_cpp(x, y, tp, ip, beta, iteration, k, with_grad)[0]


@torch.library.custom_op("uniter_fast::wra_check_finite", mutates_args=())
def _check_finite_op(dist: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float) -> torch.Tensor:
    """``dist`` (a copy) after :func:`~uniter_fast.ops.ipot.check_finite`: a ValueError
    when the distances are not finite although the real rows of the embeddings are (a
    device-side assertion on a GPU).  An op of its own, so the check runs in the compiled
    graph without reading a device scalar in the traced code."""
    check_finite(dist, beta, lambda: [x.masked_fill(txt_pad[:, :, None], 0),
                                      y.masked_fill(img_pad[:, :, None], 0)])
    return dist.clone()


@_check_finite_op.register_fake
def _check_finite_fake(dist, x, y, txt_pad, img_pad, beta):
    return torch.empty_like(dist)


_check_finite_op.register_autograd(
    lambda ctx, grad: (grad, None, None, None, None, None),
    setup_context=lambda ctx, inputs, output: None)


def _cpp_available(device, dtype):
    reason = _ext_available("cpu")(device, dtype)
    if reason is None:
        from .. import _ext
        if not hasattr(_ext.cpu_module(), "wra_forward_cpu"):
            reason = ("the C++ extension was built from older sources (no wra_forward_cpu); "
                      "rebuild it: pip install --no-build-isolation -e .")
    return reason


def _cpp():
    return _cpp_wra


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
    return torch.ops.uniter_fast.wra_check_finite(dist, x, y, tp, ip, beta)
