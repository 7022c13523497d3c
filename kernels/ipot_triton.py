"""Batched IPOT in one Triton launch: one program per example.

Contract (what :func:`uniter_fast.ops.ipot` passes, checked there): cost
``C`` [B, M, N] (float32, or float16/bfloat16 upcast on load), ``txt_pad``
[B, M] / ``img_pad`` [B, N] bool (True = padded, any pattern).  :func:`ipot`
returns the plan T [B, N, M] float32, zero on padded entries and for examples
with an empty side; :func:`ipot_distance` returns (T or None, trace(C·T) [B])
with the trace summed in the kernel's last pass.  All iterations run in the
program with float32 state; padded rows and columns are excluded by masks
(no 1e4 trick).

Per example (rows i = text, columns j = image, m/n real lengths):
A = exp(-C/beta), Q = A, sigma = 1/m, delta = 1/(n·Qᵀsigma); each iteration
sigma = 1/(m·Q delta), T = delta ⊙ Q ⊙ sigma, Q = A ⊙ T, delta = 1/(n·Qᵀsigma)
(with k−1 extra sigma/delta sweeps on a fixed Q first when k > 1).  The last
iteration is written out separately: it produces T (and the trace) instead of
the next Q.

Two kernels, chosen from the padded shape [M, N] rounded up to powers of two
≥ 16 (a handful of compiled variants, no recompilation per batch):

- :func:`_ipot_register_kernel`, tile ≤ 64×128 elements (UNITER's 60×100
  is one): A and Q stay in registers for all iterations;
- :func:`_ipot_streaming_kernel`, larger: row chunks stream A and Q through a
  float32 workspace (L2-resident).

No ``autograd.Function`` here: the plan is computed without gradient (as in
the reference); the distance's gradient is applied in :mod:`uniter_fast.ops.ipot`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launchable, interp_bound, pow2

__all__ = ["ipot", "ipot_distance", "MAX_REGISTER_TILE"]

# elements of the [BM, BN] tile kept in registers (8 warps: larger tiles spill, and with
# 16 warps ptxas caps a thread at 128 registers: benchmarks/results/gpu_compile/report.md)
MAX_REGISTER_TILE = 64 * 128
_CHUNK_ELEMS = 4096             # rows-chunk size (elements) of the streaming variant


# --------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _inv_scaled(x, valid, length):
    """1 / (length · x) on valid positions, 0 elsewhere (no division by a padded 0)."""
    return tl.where(valid, 1.0 / (length * tl.where(valid, x, 1.0)), 0.0)


@triton.jit
def _image_side(ipad_ptr, b, s_ib, s_in, N, BN: tl.constexpr):
    """(real-column mask [BN], real column count n) of example b."""
    offs_n = tl.arange(0, BN)
    in_n = offs_n < N
    ip = tl.load(ipad_ptr + b * s_ib + offs_n * s_in, mask=in_n, other=1)
    vn = in_n & (ip == 0)
    return vn, tl.sum(vn.to(tl.float32), 0)


@triton.jit
def _real_rows(tpad_ptr, b, s_tb, s_tm, rows, M, ne):
    """Mask of the real text rows among ``rows`` (all false for an empty example)."""
    tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=rows < M, other=1)
    return (rows < M) & (tp == 0) & ((tl.zeros(rows.shape, dtype=tl.float32) + ne) > 0.5)


@triton.jit
def _text_length(tpad_ptr, b, s_tb, s_tm, M, BR: tl.constexpr, M_I: tl.constexpr):
    """Real text length m of example b (count over all M rows, BR at a time)."""
    ml = tl.sum(tl.zeros([BR], dtype=tl.float32), 0)
    for r0 in range(0, M_I if M_I > 0 else M, BR):
        rows = r0 + tl.arange(0, BR)
        tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=rows < M, other=1)
        ml += tl.sum(((rows < M) & (tp == 0)).to(tl.float32), 0)
    return ml


@triton.jit
def _sweep(Q, sigma, delta, vm, vn, ml_s, nl_s):
    """One sigma/delta sweep on a fixed Q (register variant, k > 1)."""
    sigma = _inv_scaled(tl.sum(Q * delta[None, :], 1), vm, ml_s)
    delta = _inv_scaled(tl.sum(Q * sigma[:, None], 0), vn, nl_s)
    return sigma, delta


# --------------------------------------------------------------------------- register variant


@triton.jit
def _ipot_register_kernel(C_ptr, tpad_ptr, ipad_ptr, out_ptr, dist_ptr,
                          M, N, s_cb, s_cm, s_cn, s_tb, s_tm, s_ib, s_in,
                          beta, iteration, k,
                          BM: tl.constexpr, BN: tl.constexpr,
                          WITH_PLAN: tl.constexpr, WITH_DIST: tl.constexpr,
                          IT_I: tl.constexpr, K_I: tl.constexpr):
    """The whole [BM, BN] example tile in registers (BM·BN ≤ MAX_REGISTER_TILE)."""
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    vn, nl = _image_side(ipad_ptr, b, s_ib, s_in, N, BN)
    ml = _text_length(tpad_ptr, b, s_tb, s_tm, M, BM, BM)   # one chunk covers all rows
    ne = tl.minimum(ml, 1.0) * tl.minimum(nl, 1.0)           # 0.0 when a side is empty
    vn = vn & ((tl.zeros([BN], dtype=tl.float32) + ne) > 0.5)
    vm = _real_rows(tpad_ptr, b, s_tb, s_tm, offs_m, M, ne)
    ml_s = tl.maximum(ml, 1.0)
    nl_s = tl.maximum(nl, 1.0)
    v2 = vm[:, None] & vn[None, :]

    c = tl.load(C_ptr + b * s_cb + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
                mask=v2, other=0.0).to(tl.float32)
    A = tl.where(v2, tl.exp(-c / beta), 0.0)
    Q = A
    sigma = tl.where(vm, 1.0 / ml_s, 0.0)
    delta = _inv_scaled(tl.sum(Q * sigma[:, None], 0), vn, nl_s)
    # iterations 1 .. iteration-1 produce the next Q
    for it in range(IT_I - 1 if IT_I > 0 else iteration - 1):
        for kk in range(K_I - 1 if K_I > 0 else k - 1):
            sigma, delta = _sweep(Q, sigma, delta, vm, vn, ml_s, nl_s)
        sigma = _inv_scaled(tl.sum(Q * delta[None, :], 1), vm, ml_s)
        Q = A * ((delta[None, :] * Q) * sigma[:, None])
        delta = _inv_scaled(tl.sum(Q * sigma[:, None], 0), vn, nl_s)
    # the last iteration produces the plan
    for kk in range(K_I - 1 if K_I > 0 else k - 1):
        sigma, delta = _sweep(Q, sigma, delta, vm, vn, ml_s, nl_s)
    sigma = _inv_scaled(tl.sum(Q * delta[None, :], 1), vm, ml_s)
    T = (delta[None, :] * Q) * sigma[:, None]                # zero off the real block
    if WITH_PLAN:
        tl.store(out_ptr + b * N * M + offs_n[None, :] * M + offs_m[:, None], T,
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
    if WITH_DIST:
        tl.store(dist_ptr + b, tl.sum(tl.sum(c * T, 1), 0))


# --------------------------------------------------------------------------- streaming variant


@triton.jit
def _stream_sweeps(Q_b, tpad_ptr, b, s_tb, s_tm, M, N, ne, delta, vn, ml_s, nl_s, k,
                   BN: tl.constexpr, BR: tl.constexpr, M_I: tl.constexpr, K_I: tl.constexpr):
    """k − 1 sigma/delta sweeps on the fixed Q in the workspace; returns delta."""
    offs_n = tl.arange(0, BN)
    for kk in range(K_I - 1 if K_I > 0 else k - 1):
        tmp = tl.zeros([BN], dtype=tl.float32)
        for r0 in range(0, M_I if M_I > 0 else M, BR):
            rows = r0 + tl.arange(0, BR)
            vr = _real_rows(tpad_ptr, b, s_tb, s_tm, rows, M, ne)
            q = tl.load(Q_b + rows[:, None] * N + offs_n[None, :],
                        mask=(rows < M)[:, None] & (offs_n < N)[None, :], other=0.0)
            sig = _inv_scaled(tl.sum(q * delta[None, :], 1), vr, ml_s)
            tmp += tl.sum(q * sig[:, None], 0)
        delta = _inv_scaled(tmp, vn, nl_s)
    return delta


@triton.jit
def _ipot_streaming_kernel(C_ptr, tpad_ptr, ipad_ptr, out_ptr, dist_ptr, ws_ptr,
                           M, N, s_cb, s_cm, s_cn, s_tb, s_tm, s_ib, s_in,
                           beta, iteration, k,
                           BN: tl.constexpr, BR: tl.constexpr,
                           WITH_PLAN: tl.constexpr, WITH_DIST: tl.constexpr,
                           M_I: tl.constexpr, IT_I: tl.constexpr, K_I: tl.constexpr):
    """Rows in chunks of BR; A at ws[b, 0] and Q at ws[b, 1], each [M, N] row-major."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BN)
    in_n = offs_n < N
    vn, nl = _image_side(ipad_ptr, b, s_ib, s_in, N, BN)
    ml = _text_length(tpad_ptr, b, s_tb, s_tm, M, BR, M_I)
    ne = tl.minimum(ml, 1.0) * tl.minimum(nl, 1.0)
    vn = vn & ((tl.zeros([BN], dtype=tl.float32) + ne) > 0.5)
    ml_s = tl.maximum(ml, 1.0)
    nl_s = tl.maximum(nl, 1.0)
    A_b = ws_ptr + b * 2 * M * N
    Q_b = A_b + M * N

    # A = Q = exp(-C / beta) on the real block, and the first delta
    tmp = tl.zeros([BN], dtype=tl.float32)
    for r0 in range(0, M_I if M_I > 0 else M, BR):
        rows = r0 + tl.arange(0, BR)
        vr = _real_rows(tpad_ptr, b, s_tb, s_tm, rows, M, ne)
        v2 = vr[:, None] & vn[None, :]
        c = tl.load(C_ptr + b * s_cb + rows[:, None] * s_cm + offs_n[None, :] * s_cn,
                    mask=v2, other=0.0).to(tl.float32)
        a = tl.where(v2, tl.exp(-c / beta), 0.0)
        io = rows[:, None] * N + offs_n[None, :]
        io_mask = (rows < M)[:, None] & in_n[None, :]
        tl.store(A_b + io, a, mask=io_mask)
        tl.store(Q_b + io, a, mask=io_mask)
        tmp += tl.sum(a * tl.where(vr, 1.0 / ml_s, 0.0)[:, None], 0)
    delta = _inv_scaled(tmp, vn, nl_s)
    tl.debug_barrier()

    # iterations 1 .. iteration-1 produce the next Q
    for it in range(IT_I - 1 if IT_I > 0 else iteration - 1):
        delta = _stream_sweeps(Q_b, tpad_ptr, b, s_tb, s_tm, M, N, ne, delta, vn, ml_s, nl_s, k,
                               BN, BR, M_I, K_I)
        tmp = tl.zeros([BN], dtype=tl.float32)
        for r0 in range(0, M_I if M_I > 0 else M, BR):
            rows = r0 + tl.arange(0, BR)
            vr = _real_rows(tpad_ptr, b, s_tb, s_tm, rows, M, ne)
            io = rows[:, None] * N + offs_n[None, :]
            io_mask = (rows < M)[:, None] & in_n[None, :]
            q = tl.load(Q_b + io, mask=io_mask, other=0.0)
            sig = _inv_scaled(tl.sum(q * delta[None, :], 1), vr, ml_s)
            qn = tl.load(A_b + io, mask=io_mask, other=0.0) * ((delta[None, :] * q) * sig[:, None])
            tl.store(Q_b + io, qn, mask=io_mask)
            tmp += tl.sum(qn * sig[:, None], 0)
        delta = _inv_scaled(tmp, vn, nl_s)
        tl.debug_barrier()
    # the last iteration produces the plan (and the trace)
    delta = _stream_sweeps(Q_b, tpad_ptr, b, s_tb, s_tm, M, N, ne, delta, vn, ml_s, nl_s, k,
                           BN, BR, M_I, K_I)
    dist = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
    for r0 in range(0, M_I if M_I > 0 else M, BR):
        rows = r0 + tl.arange(0, BR)
        vr = _real_rows(tpad_ptr, b, s_tb, s_tm, rows, M, ne)
        io_mask = (rows < M)[:, None] & in_n[None, :]
        q = tl.load(Q_b + rows[:, None] * N + offs_n[None, :], mask=io_mask, other=0.0)
        sig = _inv_scaled(tl.sum(q * delta[None, :], 1), vr, ml_s)
        t = (delta[None, :] * q) * sig[:, None]
        if WITH_PLAN:
            tl.store(out_ptr + b * N * M + offs_n[None, :] * M + rows[:, None], t, mask=io_mask)
        if WITH_DIST:
            c = tl.load(C_ptr + b * s_cb + rows[:, None] * s_cm + offs_n[None, :] * s_cn,
                        mask=vr[:, None] & vn[None, :], other=0.0).to(tl.float32)
            dist += tl.sum(tl.sum(c * t, 1), 0)
    if WITH_DIST:
        tl.store(dist_ptr + b, dist)


# --------------------------------------------------------------------------- launcher


def _launch_config(M: int, N: int):
    """(kernel, constexprs, num_warps, workspace needed) for a padded [M, N] example."""
    BM, BN = pow2(M), pow2(N)
    if BM * BN <= MAX_REGISTER_TILE:
        return _ipot_register_kernel, dict(BM=BM, BN=BN), 4 if BM * BN <= 4096 else 8, False
    BR = max(1, min(BM, _CHUNK_ELEMS // BN))
    # 4 warps, 4096-element chunks, no software pipelining of the row-chunk loops:
    # the combination ptxas compiles without spills for every shape in the GPU
    # compile report (8 warps, smaller chunks or pipelining spill a few bytes)
    return _ipot_streaming_kernel, dict(BN=BN, BR=BR, num_stages=1), 4, True


def _run(C, txt_pad, img_pad, beta, iteration, k, with_plan, with_dist):
    check_launchable("triton ipot", C.device)
    if txt_pad.dtype != torch.bool or img_pad.dtype != torch.bool:
        raise ValueError(f"txt_pad / img_pad must be bool (True = padded); got "
                         f"{txt_pad.dtype}, {img_pad.dtype}")
    C = C.detach()
    B, M, N = C.shape
    out = torch.empty(B, N, M, device=C.device, dtype=torch.float32) if with_plan else None
    dist = torch.zeros(B, device=C.device, dtype=torch.float32)
    if B == 0 or M == 0 or N == 0:
        return (out.zero_() if with_plan else None), dist
    tp, ip = txt_pad.view(torch.uint8), img_pad.view(torch.uint8)
    kernel, meta, num_warps, streaming = _launch_config(M, N)
    args = [C, tp, ip, out if with_plan else dist, dist]
    if streaming:
        args.append(torch.empty(B, 2, M, N, device=C.device, dtype=torch.float32))
        meta["M_I"] = interp_bound(M)
    kernel[(B,)](*args, M, N, C.stride(0), C.stride(1), C.stride(2),
                 tp.stride(0), tp.stride(1), ip.stride(0), ip.stride(1),
                 float(beta), int(iteration), int(k),
                 WITH_PLAN=with_plan, WITH_DIST=with_dist,
                 IT_I=interp_bound(iteration), K_I=interp_bound(k), num_warps=num_warps, **meta)
    return out, dist


def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = 0.5, iteration: int = 50, k: int = 1) -> torch.Tensor:
    """IPOT plan [B, N, M] float32 for cost C [B, M, N]; pads: bool, True = padded."""
    return _run(C, txt_pad, img_pad, beta, iteration, k, True, False)[0]


def ipot_distance(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                  beta: float = 0.5, iteration: int = 50, k: int = 1,
                  with_plan: bool = True):
    """(plan [B, N, M] or None without ``with_plan``, trace(C·T) [B] float32 over
    the real block) in one launch."""
    return _run(C, txt_pad, img_pad, beta, iteration, k, bool(with_plan), True)
