"""Public IPOT / WRA ops.

``ipot(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1, *, backend="auto")``
returns the transport plan [B, N, M] (float32); ``ipot_distance(C, ...)``
returns trace(C·T) per example from a cost, and ``optimal_transport_dist``
UNITER's WRA distance from the embeddings, both with gradient through the
cost only.  Backends that compute the distance in the same pass as the plan
(``cpp``) do so; the others get it from their plan as the reference does.

Backends (``backend=``): ``"cuda"`` (csrc/ipot_cuda.cu, one block per
example), ``"triton"`` (kernels/ipot_triton.py, one program per example; on
CPU only under TRITON_INTERPRET=1 and never picked by "auto" there),
``"cpp"`` (csrc/ipot_cpu.cpp, OpenMP over examples: the CPU fast path),
``"reference"`` (plain PyTorch).  ``"auto"`` takes the first available in
that order for the tensors' device.
"""
from typing import Optional

import torch

from . import _registry
from ..reference import ot as _ref

OP = "ipot"


def _reference():
    return _ref.ipot


# --- cpp (csrc/ipot_cpu.cpp, OpenMP over examples: the CPU fast path) and
# --- cuda (csrc/ipot_cuda.cu, one thread block per example): the C++ extension
EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _ext_backend(device_type: str):
    """(availability, loader) of the extension's ``ipot_{cpu,cuda}`` for one device type."""
    kind = "cpu" if device_type == "cpu" else "cuda"

    def available(device, dtype):
        if device.type != device_type:
            return f"runs on {device_type.upper()} tensors, not {device.type}"
        if dtype not in EXT_DTYPES:
            return f"needs a float cost, got {dtype}"
        from .. import _ext
        return getattr(_ext, f"{kind}_unavailable_reason")()

    def load():
        from .. import _ext
        fn = getattr(getattr(_ext, f"{kind}_module")(), f"ipot_{kind}")

        def ipot_ext(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
            return fn(C.detach(), _ref._as_pad(txt_pad, "txt_pad"),
                      _ref._as_pad(img_pad, "img_pad"), float(beta), int(iteration), int(k))

        fused = getattr(getattr(_ext, f"{kind}_module")(), f"ipot_distance_{kind}", None)
        if fused is not None:
            def plan_and_distance(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1,
                                  with_plan=True):
                return fused(C.detach(), _ref._as_pad(txt_pad, "txt_pad"),
                             _ref._as_pad(img_pad, "img_pad"), float(beta), int(iteration),
                             int(k), bool(with_plan))
            ipot_ext.with_distance = plan_and_distance
        return ipot_ext
    return available, load


_cpp_available, _cpp = _ext_backend("cpu")
_cuda_available, _cuda = _ext_backend("cuda")


# --- triton: one program per example (kernels/ipot_triton.py)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available(device, dtype):
    return _registry.triton_available(device, dtype, TRITON_DTYPES)


def _triton():
    from uniter_fast.kernels import ipot_triton

    def ipot_tri(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
        return ipot_triton.ipot(C, _ref._as_pad(txt_pad, "txt_pad"),
                                _ref._as_pad(img_pad, "img_pad"), beta, iteration, k)
    return ipot_tri


_registry.register(OP, "reference", _reference, priority=0)
_registry.register(OP, "cpp", _cpp, available=_cpp_available, priority=10)
_registry.register(OP, "triton", _triton, available=_triton_available, priority=20,
                   auto=_registry.on_cuda)
_registry.register(OP, "cuda", _cuda, available=_cuda_available, priority=30)


def _check_plan_inputs(C, txt_pad, img_pad, beta, iteration, k):
    if C.dim() != 3:
        raise ValueError(f"cost C must be [B, M, N]; got shape {tuple(C.shape)}")
    if tuple(txt_pad.shape) != tuple(C.shape[:2]):
        raise ValueError(f"txt_pad shape {tuple(txt_pad.shape)} != [B, M] {tuple(C.shape[:2])}")
    if tuple(img_pad.shape) != (C.size(0), C.size(2)):
        raise ValueError(f"img_pad shape {tuple(img_pad.shape)} != [B, N] {(C.size(0), C.size(2))}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if int(iteration) < 1 or int(k) < 1:
        raise ValueError(f"iteration and k must be >= 1, got iteration={iteration}, k={k}")


def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = 0.5, iteration: int = 50, k: int = 1, *,
         backend: Optional[str] = None) -> torch.Tensor:
    """IPOT plan for cost C [B, M, N]; pads are 1 = padded. Returns [B, N, M] float32."""
    _check_plan_inputs(C, txt_pad, img_pad, beta, iteration, k)
    fn = _registry.resolve(OP, backend, C.device, C.dtype)
    return fn(C.detach(), txt_pad, img_pad, float(beta), int(iteration), int(k))


class _FusedDistance(torch.autograd.Function):
    """trace(C·T) from a kernel that returns (T, distance) in one pass.

    Forward runs the kernel on the detached cost; backward is the reference's
    gradient, d distance / d C = Tᵀ (the plan is a constant)."""

    @staticmethod
    def forward(ctx, C, txt_pad, img_pad, beta, iteration, k, fused):
        T, dist = fused(C.detach(), txt_pad, img_pad, beta, iteration, k)
        ctx.save_for_backward(T)
        ctx.cost_dtype = C.dtype
        return dist

    @staticmethod
    def backward(ctx, grad):
        (T,) = ctx.saved_tensors
        grad_C = (grad[:, None, None] * T.transpose(1, 2)).to(ctx.cost_dtype)
        return grad_C, None, None, None, None, None, None


def ipot_distance(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                  beta: float = 0.5, iteration: int = 50, k: int = 1, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """trace(C·T) per example, [B] float32, T the IPOT plan of the detached C.

    Same contract as :func:`uniter_fast.reference.ipot_distance`: gradient
    through C only, padded entries of a finite C do not contribute."""
    _check_plan_inputs(C, txt_pad, img_pad, beta, iteration, k)
    fn = _registry.resolve(OP, backend, C.device, C.dtype)
    fused = getattr(fn, "with_distance", None)
    if fused is None:
        return _ref.ipot_distance(C, txt_pad, img_pad, float(beta), int(iteration), int(k),
                                  ipot_fn=fn)
    if not (C.requires_grad and torch.is_grad_enabled()):
        # no backward: the kernel need not write the [B, N, M] plan at all
        return fused(C.detach(), txt_pad, img_pad, float(beta), int(iteration), int(k),
                     with_plan=False)[1]
    return _FusedDistance.apply(C, txt_pad, img_pad, float(beta), int(iteration), int(k), fused)


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor,
                           txt_pad: torch.Tensor, img_pad: torch.Tensor,
                           beta: float = 0.5, iteration: int = 50, k: int = 1, *,
                           backend: Optional[str] = None) -> torch.Tensor:
    """UNITER's WRA distance [B] (float32), IPOT on the chosen backend."""
    def distance(cost, txt_pad, img_pad, beta, iteration, k):
        return ipot_distance(cost, txt_pad, img_pad, beta, iteration, k, backend=backend)
    return _ref.optimal_transport_dist(txt_emb, img_emb, txt_pad, img_pad, beta, iteration, k,
                                       distance_fn=distance)
