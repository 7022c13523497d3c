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


@torch.no_grad()
def ipot_log_domain(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                    beta: float = IPOT_BETA, iteration: int = IPOT_ITERATIONS,
                    k: int = IPOT_INNER_ITERATIONS) -> torch.Tensor:
    """The updates of :func:`ipot` in the log domain, in float64: the plan for any
    beta > 0 and any finite cost (same signature and result layout as :func:`ipot`).

    Every IPOT update is a product or ratio of positive numbers, so with
    a = log A = -C/beta, t = log T, s = log sigma, d = log delta they read

        q = a + t
        d_j = -log n - logsumexp_i(q_ij + s_i)
        s_i = -log m - logsumexp_j(q_ij + d_j)
        t = s_i + q + d_j

    and logsumexp never under- or overflows, whatever C/beta.  Before that each
    column's minimum over the real rows is subtracted from C (delta absorbs a
    column factor of A exactly: the plan is unchanged, the exponents smaller).
    Padded entries are -inf (weight 0); an example with an empty side gets a zero
    plan.  The float32 IPOT of :func:`ipot` (UNITER's) loses plan entries when
    C/beta spans too much (an entry that falls below float32's range cannot come
    back, Q = A * T); ``uniter_fast.ops.ipot`` computes such costs here.
    """
    txt_pad = _as_pad(txt_pad, "txt_pad")
    img_pad = _as_pad(img_pad, "img_pad")
    C = C.detach().double()
    b, m, n = C.shape
    pad = txt_pad[:, :, None] | img_pad[:, None, :]                      # [B, M, N]
    ninf = float("-inf")
    col = C.masked_fill(pad, float("inf")).amin(1, keepdim=True)         # [B, 1, N]
    col = torch.where(torch.isfinite(col), col, torch.zeros_like(col))
    log_a = (-(C - col) / beta).masked_fill(pad, ninf)
    log_m = (m - txt_pad.sum(1)).clamp(min=1).double().log()[:, None]    # [B, 1]
    log_n = (n - img_pad.sum(1)).clamp(min=1).double().log()[:, None]
    log_sigma = (-log_m).expand(b, m).masked_fill(txt_pad, ninf)          # [B, M]
    log_t = torch.zeros_like(C).masked_fill(pad, ninf)
    for _ in range(iteration):
        log_q = log_a + log_t
        for _ in range(k):
            log_delta = (-log_n - torch.logsumexp(log_q + log_sigma[:, :, None], 1)
                         ).masked_fill(img_pad, ninf)                     # [B, N]
            log_sigma = (-log_m - torch.logsumexp(log_q + log_delta[:, None, :], 2)
                         ).masked_fill(txt_pad, ninf)
        # (an empty side makes some of these nan; all of that example is padded)
        log_t = (log_sigma[:, :, None] + log_q + log_delta[:, None, :]).masked_fill(pad, ninf)
    return log_t.exp().transpose(1, 2).float()


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
