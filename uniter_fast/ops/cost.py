"""Public cosine-cost op of the WRA loss.

``cost_matrix_cosine(x, y, eps=1e-5, *, txt_pad=None, img_pad=None, backend="auto")``
returns C = 1 − cos(x_i, y_j), [B, M, N] float32, from x [B, M, D] and
y [B, N, D] (any floating dtype, computed in float32), with zero on the
entries whose row or column is padded when the pads are given.  The
normalisation is UNITER's ``F.normalize(·, eps)``: a row of norm below
``eps`` is divided by ``eps``.

Backends:

* ``torch`` (default): C = 1 − (x yᵀ) · r_x r_yᵀ with the reciprocal row norms
  r = 1 / max(‖·‖, eps) kept as [B, M] / [B, N] vectors: no normalised
  copies of the embeddings, one batched matmul; a hand-written backward
  (dx = −W y + a ⊙ x, W = G ⊙ r_x r_yᵀ, a = r_x² Σ_j G ⊙ cos) with two
  batched matmuls and no [B, L, D] temporaries beyond the gradients.
* ``reference``: UNITER's sequence, ``F.normalize`` copies, then the matmul.
"""
from typing import Optional, Tuple

import torch

from ..constants import COSINE_EPS
from ..reference import ot as _ref
from . import _registry
from .ipot import as_pad

COST_OP = "cost_matrix_cosine"


# ----------------------------------------------------------------- input contract

def check_embeddings(txt_emb, img_emb, txt_pad=None, img_pad=None
                     ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The contract of the WRA ops' embeddings and pads; returns bool pads
    (None where not given)."""
    for name, t in (("txt_emb", txt_emb), ("img_emb", img_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [B, L, D] tensor; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating, got {t.dtype}")
    if txt_emb.size(0) != img_emb.size(0):
        raise ValueError(f"batch size mismatch: txt_emb has {txt_emb.size(0)}, "
                         f"img_emb has {img_emb.size(0)}")
    if txt_emb.size(2) != img_emb.size(2):
        raise ValueError(f"hidden size mismatch: txt_emb has {txt_emb.size(2)}, "
                         f"img_emb has {img_emb.size(2)}")
    if txt_emb.device != img_emb.device:
        raise ValueError(f"txt_emb is on {txt_emb.device}, img_emb on {img_emb.device}")
    tp = None if txt_pad is None else as_pad(txt_pad, "txt_pad", txt_emb.shape[:2], txt_emb.device)
    ip = None if img_pad is None else as_pad(img_pad, "img_pad", img_emb.shape[:2], img_emb.device)
    return tp, ip


def _joint_pad(tp, ip):
    if tp is None and ip is None:
        return None
    if tp is None:
        return ip[:, None, :]
    if ip is None:
        return tp[:, :, None]
    return tp[:, :, None] | ip[:, None, :]


# ----------------------------------------------------------------- backends

def _reference_cost(x, y, tp, ip, eps):
    cost = _ref.cost_matrix_cosine(x.float(), y.float(), eps)
    pad = _joint_pad(tp, ip)
    return cost if pad is None else cost.masked_fill(pad, 0)


def _inv_norm(t: torch.Tensor, eps: float):
    """(1 / max(‖t_i‖, eps), ‖t_i‖ ≥ eps) over the last dim."""
    n = torch.linalg.vector_norm(t, dim=-1)
    return n.clamp_min(eps).reciprocal_(), n >= eps


class _ScaledCosineCost(torch.autograd.Function):
    """C = 1 − (x yᵀ) ⊙ r_x r_yᵀ, padded entries 0; float32 x, y."""

    @staticmethod
    def forward(ctx, x, y, pad, eps):
        rx, kx = _inv_norm(x, eps)
        ry, ky = _inv_norm(y, eps)
        cost = torch.bmm(x, y.transpose(1, 2))               # x·y, then cos in place
        cost.mul_(rx[:, :, None]).mul_(ry[:, None, :])
        cost.neg_().add_(1.0)
        if pad is not None:
            cost.masked_fill_(pad, 0.0)
        ctx.save_for_backward(x, y, rx, ry, kx, ky, cost)
        ctx.pad = pad
        return cost

    @staticmethod
    def backward(ctx, grad):
        x, y, rx, ry, kx, ky, cost = ctx.saved_tensors
        g = grad if ctx.pad is None else grad.masked_fill(ctx.pad, 0.0)
        gcos = g * (1.0 - cost)                              # G ⊙ cos (padded: G = 0)
        w = g * rx[:, :, None] * ry[:, None, :]              # dC/d(x·y) = −W
        dx = dy = None
        if ctx.needs_input_grad[0]:
            ax = gcos.sum(2) * rx * rx * kx                  # norm term (0 where clamped)
            dx = torch.baddbmm(x * ax[:, :, None], w, y, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            ay = gcos.sum(1) * ry * ry * ky
            dy = torch.baddbmm(y * ay[:, :, None], w.transpose(1, 2), x, alpha=-1.0)
        return dx, dy, None, None


def _scaled_cost(x, y, tp, ip, eps):
    return _ScaledCosineCost.apply(x.float(), y.float(), _joint_pad(tp, ip), float(eps))


_registry.register(COST_OP, "reference", lambda: _reference_cost, priority=0)
_registry.register(COST_OP, "torch", lambda: _scaled_cost, priority=10)


# ----------------------------------------------------------------- public op

def cosine_cost_unchecked(x, y, tp, ip, eps: float = COSINE_EPS, *, backend=None):
    """:func:`cost_matrix_cosine` on inputs that already meet its contract."""
    return _registry.resolve(COST_OP, backend, x.device, torch.float32)(x, y, tp, ip, eps)


def cost_matrix_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = COSINE_EPS, *,
                       txt_pad: Optional[torch.Tensor] = None,
                       img_pad: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Cosine distance 1 − cos(x_i, y_j), [B, M, D] × [B, N, D] → [B, M, N]
    float32; entries of padded rows (``txt_pad``) / columns (``img_pad``,
    1 = padded) are 0."""
    tp, ip = check_embeddings(x, y, txt_pad, img_pad)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return cosine_cost_unchecked(x, y, tp, ip, float(eps), backend=backend)
