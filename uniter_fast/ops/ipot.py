"""Public IPOT / WRA ops.

``ipot(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1, *, backend="auto")``
returns the transport plan [B, N, M] (float32); ``optimal_transport_dist``
returns UNITER's WRA distance per example with gradient through the cost only.

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


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor,
                           txt_pad: torch.Tensor, img_pad: torch.Tensor,
                           beta: float = 0.5, iteration: int = 50, k: int = 1, *,
                           backend: Optional[str] = None) -> torch.Tensor:
    """UNITER's WRA distance [B] (float32), IPOT on the chosen backend."""
    fn = _registry.resolve(OP, backend, txt_emb.device, torch.float32)
    return _ref.optimal_transport_dist(txt_emb, img_emb, txt_pad, img_pad, beta, iteration, k,
                                       ipot_fn=fn)
