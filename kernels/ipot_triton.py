"""Batched IPOT in one Triton launch: one program per example.

Contract (same as :func:`uniter_fast.reference.ipot`): cost ``C`` [B, M, N]
(float32, or float16/bfloat16 upcast on load), ``txt_pad`` [B, M] /
``img_pad`` [B, N] bool (True = padded, any pattern), returns the plan
T [B, N, M] float32, zero on padded entries and for examples with an empty
side.  All iterations run in the program with float32 state; padded rows and
columns are excluded by masks (no 1e4 trick).

Per example (rows i = text, columns j = image, m/n real lengths):
A = exp(-C/beta), Q = A, sigma = 1/m, delta = 1/(n·Qᵀsigma); each iteration
sigma = 1/(m·Q delta), T = delta ⊙ Q ⊙ sigma, Q = A ⊙ T, delta = 1/(n·Qᵀsigma)
(with k−1 extra sigma/delta sweeps on a fixed Q first when k > 1).

Two variants, chosen from the padded shape [M, N] rounded up to powers of two
≥ 16 (a handful of compiled variants, no recompilation per batch):
- tile ≤ 128×128 elements: A and Q stay in registers for all iterations;
- larger: row chunks stream A and Q through a float32 workspace (L2-resident).

No ``autograd.Function`` here: the plan is computed without gradient (as in
the reference); the WRA distance's gradient flows through the cost in
:func:`uniter_fast.ops.optimal_transport_dist`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["ipot", "MAX_REGISTER_TILE"]

MAX_REGISTER_TILE = 128 * 128   # elements of the [BM, BN] tile kept in registers
_CHUNK_ELEMS = 4096             # rows-chunk size (elements) of the streaming variant


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _inv_scaled(x, valid, length):
    """1 / (length · x) on valid positions, 0 elsewhere (no division by a padded 0)."""
    return tl.where(valid, 1.0 / (length * tl.where(valid, x, 1.0)), 0.0)


@triton.jit
def _ipot_kernel(C_ptr, tpad_ptr, ipad_ptr, out_ptr, ws_ptr,
                 M, N, s_cb, s_cm, s_cn, s_tb, s_tm, s_ib, s_in,
                 beta, iteration, k,
                 BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                 SINGLE: tl.constexpr, M_I: tl.constexpr, IT_I: tl.constexpr,
                 K_I: tl.constexpr):
    # M_I / IT_I / K_I: loop bounds as constexprs when interpreting (the
    # interpreter cannot loop to a runtime int argument); 0 on GPU = runtime.
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BN)
    in_n = offs_n < N
    ip = tl.load(ipad_ptr + b * s_ib + offs_n * s_in, mask=in_n, other=1)
    vn = in_n & (ip == 0)
    nl = tl.sum(vn.to(tl.float32), 0)
    # real text length (count over all M rows, chunk by chunk)
    ml = tl.sum(tl.zeros([BR], dtype=tl.float32), 0)
    for r0 in range(0, M_I if M_I > 0 else M, BR):
        rows = r0 + tl.arange(0, BR)
        tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=rows < M, other=1)
        ml += tl.sum(((rows < M) & (tp == 0)).to(tl.float32), 0)
    # 1.0 when both sides are non-empty, else 0.0 (an empty side ⇒ zero plan)
    ne = tl.minimum(ml, 1.0) * tl.minimum(nl, 1.0)
    vn = vn & ((tl.zeros([BN], dtype=tl.float32) + ne) > 0.5)
    ml_s = tl.maximum(ml, 1.0)
    nl_s = tl.maximum(nl, 1.0)
    out_b = out_ptr + b * N * M

    if SINGLE:
        offs_m = tl.arange(0, BM)
        in_m = offs_m < M
        tp = tl.load(tpad_ptr + b * s_tb + offs_m * s_tm, mask=in_m, other=1)
        vm = in_m & (tp == 0) & ((tl.zeros([BM], dtype=tl.float32) + ne) > 0.5)
        v2 = vm[:, None] & vn[None, :]
        c = tl.load(C_ptr + b * s_cb + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
                    mask=v2, other=0.0).to(tl.float32)
        A = tl.where(v2, tl.exp(-c / beta), 0.0)
        Q = A
        sigma = tl.where(vm, 1.0 / ml_s, 0.0)
        tmp = tl.sum(Q * sigma[:, None], 0)
        delta = _inv_scaled(tmp, vn, nl_s)
        T = Q
        for it in range(IT_I if IT_I > 0 else iteration):
            for kk in range(K_I - 1 if K_I > 0 else k - 1):
                s = tl.sum(Q * delta[None, :], 1)
                sigma = _inv_scaled(s, vm, ml_s)
                tmp = tl.sum(Q * sigma[:, None], 0)
                delta = _inv_scaled(tmp, vn, nl_s)
            s = tl.sum(Q * delta[None, :], 1)
            sigma = _inv_scaled(s, vm, ml_s)
            T = (delta[None, :] * Q) * sigma[:, None]
            Q = A * T
            tmp = tl.sum(Q * sigma[:, None], 0)
            delta = _inv_scaled(tmp, vn, nl_s)
        tl.store(out_b + offs_n[None, :] * M + offs_m[:, None], T,
                 mask=in_m[:, None] & in_n[None, :])
    else:
        # streaming variant: A at ws[b, 0], Q at ws[b, 1], each [M, N] row-major
        A_b = ws_ptr + b * 2 * M * N
        Q_b = A_b + M * N
        tmp = tl.zeros([BN], dtype=tl.float32)
        for r0 in range(0, M_I if M_I > 0 else M, BR):
            rows = r0 + tl.arange(0, BR)
            in_r = rows < M
            tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=in_r, other=1)
            vr = in_r & (tp == 0) & ((tl.zeros([BR], dtype=tl.float32) + ne) > 0.5)
            v2 = vr[:, None] & vn[None, :]
            c = tl.load(C_ptr + b * s_cb + rows[:, None] * s_cm + offs_n[None, :] * s_cn,
                        mask=v2, other=0.0).to(tl.float32)
            a = tl.where(v2, tl.exp(-c / beta), 0.0)
            io = rows[:, None] * N + offs_n[None, :]
            io_mask = in_r[:, None] & in_n[None, :]
            tl.store(A_b + io, a, mask=io_mask)
            tl.store(Q_b + io, a, mask=io_mask)
            sig = tl.where(vr, 1.0 / ml_s, 0.0)
            tmp += tl.sum(a * sig[:, None], 0)
        delta = _inv_scaled(tmp, vn, nl_s)
        tl.debug_barrier()
        for it in range(IT_I if IT_I > 0 else iteration):
            for kk in range(K_I - 1 if K_I > 0 else k - 1):
                tmp = tl.zeros([BN], dtype=tl.float32)
                for r0 in range(0, M_I if M_I > 0 else M, BR):
                    rows = r0 + tl.arange(0, BR)
                    in_r = rows < M
                    tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=in_r, other=1)
                    vr = in_r & (tp == 0) & ((tl.zeros([BR], dtype=tl.float32) + ne) > 0.5)
                    io = rows[:, None] * N + offs_n[None, :]
                    q = tl.load(Q_b + io, mask=in_r[:, None] & in_n[None, :], other=0.0)
                    s = tl.sum(q * delta[None, :], 1)
                    sig = _inv_scaled(s, vr, ml_s)
                    tmp += tl.sum(q * sig[:, None], 0)
                delta = _inv_scaled(tmp, vn, nl_s)
            last = it == iteration - 1
            keep = it != iteration - 1
            tmp = tl.zeros([BN], dtype=tl.float32)
            for r0 in range(0, M_I if M_I > 0 else M, BR):
                rows = r0 + tl.arange(0, BR)
                in_r = rows < M
                tp = tl.load(tpad_ptr + b * s_tb + rows * s_tm, mask=in_r, other=1)
                vr = in_r & (tp == 0) & ((tl.zeros([BR], dtype=tl.float32) + ne) > 0.5)
                io = rows[:, None] * N + offs_n[None, :]
                io_mask = in_r[:, None] & in_n[None, :]
                q = tl.load(Q_b + io, mask=io_mask, other=0.0)
                a = tl.load(A_b + io, mask=io_mask, other=0.0)
                s = tl.sum(q * delta[None, :], 1)
                sig = _inv_scaled(s, vr, ml_s)
                t = (delta[None, :] * q) * sig[:, None]
                qn = a * t
                tl.store(Q_b + io, qn, mask=io_mask & keep)
                tl.store(out_b + offs_n[None, :] * M + rows[:, None], t, mask=io_mask & last)
                tmp += tl.sum(qn * sig[:, None], 0)
            delta = _inv_scaled(tmp, vn, nl_s)
            tl.debug_barrier()


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def _check(C, txt_pad, img_pad, beta, iteration, k):
    if not isinstance(C, torch.Tensor) or C.dim() != 3:
        raise ValueError(f"cost C must be a [B, M, N] tensor; got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C)}")
    if C.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cost C must be float32/float16/bfloat16; got {C.dtype}")
    for name, pad, want in (("txt_pad", txt_pad, (C.size(0), C.size(1))),
                            ("img_pad", img_pad, (C.size(0), C.size(2)))):
        if not isinstance(pad, torch.Tensor) or pad.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True = padded); got "
                             f"{pad.dtype if isinstance(pad, torch.Tensor) else type(pad)}")
        if tuple(pad.shape) != want:
            raise ValueError(f"{name} shape {tuple(pad.shape)} != {list(want)}")
        if pad.device != C.device:
            raise ValueError(f"{name} is on {pad.device}, C on {C.device}")
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be > 0, got {beta}")
    if int(iteration) < 1 or int(k) < 1:
        raise ValueError(f"iteration and k must be >= 1, got iteration={iteration}, k={k}")
    if C.device.type != "cuda" and not _interpreting():
        raise ValueError(f"triton ipot runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                         f"got {C.device}")


def ipot(C: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
         beta: float = 0.5, iteration: int = 50, k: int = 1) -> torch.Tensor:
    """IPOT plan [B, N, M] float32 for cost C [B, M, N]; pads: True = padded."""
    _check(C, txt_pad, img_pad, beta, iteration, k)
    C = C.detach()
    B, M, N = C.shape
    out = torch.empty(B, N, M, device=C.device, dtype=torch.float32)
    if B == 0 or M == 0 or N == 0:
        return out.zero_()
    tp = txt_pad.view(torch.uint8)
    ip = img_pad.view(torch.uint8)
    BM, BN = _pow2(M), _pow2(N)
    single = BM * BN <= MAX_REGISTER_TILE
    interp = _interpreting()
    if single:
        BR = BM
        ws = out  # unused by the register variant
        num_warps = 4 if BM * BN <= 4096 else (8 if BM * BN <= 8192 else 16)
    else:
        BR = max(1, min(BM, _CHUNK_ELEMS // BN))
        ws = torch.empty(B, 2, M, N, device=C.device, dtype=torch.float32)
        num_warps = 8
    _ipot_kernel[(B,)](
        C, tp, ip, out, ws, M, N,
        C.stride(0), C.stride(1), C.stride(2), tp.stride(0), tp.stride(1),
        ip.stride(0), ip.stride(1), float(beta), int(iteration), int(k),
        BM=BM, BN=BN, BR=BR, SINGLE=single,
        M_I=M if interp else 0, IT_I=int(iteration) if interp else 0, K_I=int(k) if interp else 0,
        num_warps=num_warps)
    return out
