"""Public IPOT / WRA ops.

``ipot(C, txt_pad, img_pad, beta=0.5, iteration=50, k=1, *, backend="auto")``
returns the transport plan [B, N, M] (float32); ``optimal_transport_dist``
returns UNITER's WRA distance per example with gradient through the cost only.
"""
from typing import Optional

import torch

from . import _registry
from ..reference import ot as _ref

OP = "ipot"


def _reference():
    return _ref.ipot


_registry.register(OP, "reference", _reference, priority=0)


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
