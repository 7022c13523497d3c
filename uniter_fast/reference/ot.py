"""Reference IPOT (inexact proximal point optimal transport), UNITER's algorithm.

Transcribes UNITER's ``model/ot.py`` batched IPOT with two defects fixed
without changing any defined number: an example whose text or image side
has length 0 gets a zero plan (the original divides by zero and returns NaN),
k > 1 inner iterations work (the original fails on a shape mismatch), and
:func:`ipot_distance` computes trace(C·T) as sum(C ⊙ Tᵀ) instead of a B×M×M product.
"""
import torch

from ..constants import (
    COSINE_EPS,
    IPOT_BETA,
    IPOT_INNER_ITERATIONS,
    IPOT_ITERATIONS,
    IPOT_PAD_PENALTY,
)


def _as_pad(pad: torch.Tensor, name: str) -> torch.Tensor:
    if pad.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64):
        raise ValueError(f"{name} must be a bool/integer padding mask (1 = padded), got {pad.dtype}")
    return pad.bool()


@torch.no_grad()
def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
         k: int = IPOT_INNER_ITERATIONS) -> torch.Tensor:
    """Transport plan for cost ``C`` [B, M, N] (text × image).

    txt_pad [B, M] / img_pad [B, N]: 1 = padded position.  Returns the plan
    T in UNITER's orientation, [B, N, M], float32, zero on padded entries and
    for examples with an empty side.  Computed in float32 whatever C's dtype.
    """
    C = C.detach().float()
    txt_pad = _as_pad(txt_pad, "txt_pad")
    img_pad = _as_pad(img_pad, "img_pad")
    b, m, n = C.shape
    x_len = (m - txt_pad.sum(1)).float()
    y_len = (n - img_pad.sum(1)).float()
    empty = (x_len == 0) | (y_len == 0)
    # run empty examples as if unpadded (finite, discarded at the end)
    x_pad = txt_pad & ~empty[:, None]
    y_pad = img_pad & ~empty[:, None]
    x_len = torch.where(empty, torch.full_like(x_len, m), x_len)
    y_len = torch.where(empty, torch.full_like(y_len, n), y_len)
    joint_pad = (x_pad[:, :, None] | y_pad[:, None, :]).transpose(1, 2)  # [B, N, M]

    sigma = (torch.ones(b, m, device=C.device) / x_len[:, None]).masked_fill(x_pad, 0)
    T = torch.ones(b, n, m, device=C.device).masked_fill(joint_pad, 0)
    A = torch.exp(-C.transpose(1, 2) / beta).masked_fill(joint_pad, 0)
    x_len3 = x_len[:, None, None]
    y_len3 = y_len[:, None, None]
    x_mask = (x_pad.float() * IPOT_PAD_PENALTY)[:, None, :]
    y_mask = (y_pad.float() * IPOT_PAD_PENALTY)[:, None, :]
    for _ in range(iteration):
        Q = A * T
        for _ in range(k):
            sigma = sigma.view(b, m, 1)   # (the original reshapes only once: k > 1 crashed)
            delta = 1 / (y_len3 * Q.matmul(sigma).view(b, 1, n) + y_mask)
            sigma = 1 / (x_len3 * delta.matmul(Q) + x_mask)
        T = delta.view(b, n, 1) * Q * sigma
    T = T.masked_fill(joint_pad, 0)
    return T.masked_fill(empty[:, None, None], 0)


def cost_matrix_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Cosine distance 1 − cos(x_i, y_j): [B, M, D] × [B, N, D] → [B, M, N]."""
    x = torch.nn.functional.normalize(x, p=2, dim=-1, eps=eps)
    y = torch.nn.functional.normalize(y, p=2, dim=-1, eps=eps)
    return 1 - x.matmul(y.transpose(1, 2))


def ipot_distance(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                  beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                  k: int = IPOT_INNER_ITERATIONS, *, ipot_fn=ipot) -> torch.Tensor:
    """UNITER's WRA distance from a cost: trace(C·T) per example, [B], float32.

    T is the IPOT plan of the detached ``C`` [B, M, N] (``ipot_fn``, the
    reference by default) and is zero off the real block, so padded entries of
    a finite C do not contribute; the gradient flows only through C
    (d distance / d C = Tᵀ).  Computed as sum(C ⊙ Tᵀ), not UNITER's B×M×M product.
    """
    T = ipot_fn(C.detach(), txt_pad, img_pad, beta, int(iteration), int(k))
    return (C.float() * T.detach().transpose(1, 2)).sum(dim=(1, 2))


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor,
                           txt_pad: torch.Tensor, img_pad: torch.Tensor,
                           beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                           k: int = IPOT_INNER_ITERATIONS, *, distance_fn=ipot_distance) -> torch.Tensor:
    """UNITER's WRA distance per example, [B], float32.

    Cosine cost in float32 with padded positions zeroed, then
    ``distance_fn(cost, txt_pad, img_pad, beta, iteration, k)``
    (:func:`ipot_distance` by default): plan from IPOT on the detached cost,
    distance = trace(C·T), gradients only through the cost.  Padded positions
    and empty sequences contribute 0.
    """
    txt_pad = _as_pad(txt_pad, "txt_pad")
    img_pad = _as_pad(img_pad, "img_pad")
    cost = cost_matrix_cosine(txt_emb.float(), img_emb.float())
    joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]
    cost = cost.masked_fill(joint_pad, 0)
    return distance_fn(cost, txt_pad, img_pad, beta, int(iteration), int(k))
