"""Fused masked self-attention for UNITER (FlashAttention-2 style, Triton).

Math (identical to :func:`uniter_fast.reference.attention`)::

    S   = q kᵀ · scale + (1 − attn_mask[b, key]) · (−10000)
    P   = softmax(S)            # over keys; block padding (key ≥ seq) excluded entirely
    out = dropout(P) v

* q, k, v: [batch, heads, seq, head_dim] (any strides), fp16 / bf16 / fp32;
  attn_mask: [batch, seq], 1 = real token.  Any seq ≥ 1 (no multiple-of-block
  requirement); head_dim 1..128 (padded to a power of two ≥ 16 inside).
* Real-but-masked keys get −10000 added (NOT −inf), so a query whose keys are
  all padding gets the uniform average, exactly like the reference.  Keys past
  the end of the sequence (tile padding) get −inf and never contribute.
* Forward saves only O and the per-row log-sum-exp (fp32, log2 domain).
  Backward: delta = rowsum(dO·O) (tiny pre-pass kernel), then one kernel for
  dK/dV (program per key block, loop over query blocks) and one for dQ
  (program per query block, loop over key blocks).  No atomics, nothing
  O(seq²) stored.  fp32 accumulation; P and dS are rounded to the input dtype
  before their matmuls.
* Dropout runs inside the kernels: keep(b, h, i, j) = rand(seed, offset +
  ((b·H + h)·seq + i)·seq + j) ≥ p (Philox via ``tl.rand``), regenerated
  bit-identically in the backward kernels.  :func:`dropout_keep_mask`
  materialises the same mask for tests.
* On a GPU the block sizes are autotuned, keyed on a length bucket (next
  power of two of seq), never on the exact length.  Under TRITON_INTERPRET=1
  (CPU) one fixed config is used, and bf16 tiles are upcast to fp32 before
  ``tl.dot`` (the interpreter's bf16 dot is wrong) after rounding P / dS to
  bf16 (round-to-nearest done by hand: the interpreter's bf16 cast
  truncates), so the rounding matches the GPU path.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from uniter_fast.constants import ATTENTION_MASK_VALUE, TRITON_ATTENTION_MAX_HEAD_DIM

from ._common import check_launchable, interp_bound, interpreting, pow2, round_bf16_rtne

__all__ = ["attention", "dropout_keep_mask", "SUPPORTED_DTYPES", "MAX_HEAD_DIM",
           "head_dim_supported"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = TRITON_ATTENTION_MAX_HEAD_DIM
_LOG2E = 1.4426950408889634
_KERNEL_TYPES = (JITFunction, Autotuner, InterpretedFunction)


def head_dim_supported(head_dim: int) -> bool:
    return 1 <= head_dim <= MAX_HEAD_DIM


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _keep(seed, philox_offset, pid_bh, seq, rows, cols, dropout_p):
    """Dropout keep-mask for the (rows, cols) grid of one (batch, head).

    ``rows`` and ``cols`` are broadcastable int tensors of query / key
    indices; the Philox counter of element (i, j) is
    philox_offset + ((b·H + h)·seq + i)·seq + j (64-bit)."""
    off = philox_offset + (pid_bh.to(tl.int64) * seq + rows) * seq + cols
    return tl.rand(seed, off) >= dropout_p


@triton.jit
def _lowp(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round to the input dtype for a matmul operand.  UPCAST (interpreter +
    bf16): round to bf16 but keep fp32, as the interpreter's bf16 dot is wrong."""
    if UPCAST:
        y = round_bf16_rtne(x)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _to_out(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Final cast of an fp32 result to the output dtype (round to nearest)."""
    if UPCAST:
        x = round_bf16_rtne(x)
    return x.to(DTYPE)



# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _attn_fwd_kernel(
    Q, K, V, Bias, O, LSE,
    qk_scale, seed, philox_offset, dropout_p,
    seq, H, D,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    s_bb,
    SEQ_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SEQ_INTERP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DTYPE = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq
    d_ok = offs_d < D

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The interpreter (NumPy 2.x) cannot use a runtime scalar as a range bound,
    # so there the launcher also passes the length as the constexpr SEQ_INTERP.
    for start_n in range(0, SEQ_INTERP if SEQ_INTERP > 0 else seq, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seq
        kt = tl.load(K + b * s_kb + h * s_kh + offs_n[None, :] * s_ks + offs_d[:, None] * s_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :] * s_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        bias = tl.load(Bias + b * s_bb + offs_n, mask=n_ok, other=0.0) * 1.4426950408889634
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale + bias[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # key 0 is always in bounds, so m_new is finite from the first block on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, philox_offset, pid_bh, seq, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(_lowp(p, DTYPE, UPCAST), v, acc, input_precision=PREC)
        m_i = m_new

    if DROPOUT:
        acc = acc / (l_i * (1.0 - dropout_p))[:, None]
    else:
        acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :] * s_od,
             _to_out(acc, O.dtype.element_ty, UPCAST), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * seq + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta, seq, H, D,
    s_ob, s_oh, s_os, s_od,
    s_db, s_dh, s_ds, s_dd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < seq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :] * s_od,
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :] * s_dd,
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq + offs_m, tl.sum(o * do, 1), mask=offs_m < seq)


@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, Bias, DO, LSE, Delta, DK, DV,
    sm_scale, qk_scale, seed, philox_offset, dropout_p,
    seq, H, D,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_db, s_dh, s_ds, s_dd,
    s_kgb, s_kgh, s_kgs, s_kgd,
    s_vgb, s_vgh, s_vgs, s_vgd,
    s_bb,
    SEQ_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SEQ_INTERP: tl.constexpr,
):
    """One program per key block; loops over all query blocks."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DTYPE = Q.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_ks + offs_d[None, :] * s_kd,
                mask=nd_ok, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :] * s_vd,
                mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    bias = tl.load(Bias + b * s_bb + offs_n, mask=n_ok, other=0.0) * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row_base = pid_bh.to(tl.int64) * seq
    # The interpreter (NumPy 2.x) cannot use a runtime scalar as a range bound,
    # so there the launcher also passes the length as the constexpr SEQ_INTERP.
    for start_m in range(0, SEQ_INTERP if SEQ_INTERP > 0 else seq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < seq
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd,
                    mask=md_ok, other=0.0)
        do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :] * s_dd,
                     mask=md_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale + bias[:, None]   # [N, M]
        valid = n_ok[:, None] & m_ok[None, :]
        pt = tl.exp2(tl.where(valid, st - lse[None, :], float("-inf")))  # 0 outside the tile's valid part
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                             # [N, M]
        if DROPOUT:
            keep = _keep(seed, philox_offset, pid_bh, seq, offs_m[None, :], offs_n[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdt = tl.where(keep, pt * inv_keep, 0.0)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            pdt = pt
        dv = tl.dot(_lowp(pdt, DTYPE, UPCAST), do, dv, input_precision=PREC)
        dst = tl.where(valid, pt * (dpt - delta[None, :]), 0.0)
        dk = tl.dot(_lowp(dst, DTYPE, UPCAST), q, dk, input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + b * s_kgb + h * s_kgh + offs_n[:, None] * s_kgs + offs_d[None, :] * s_kgd,
             _to_out(dk, DK.dtype.element_ty, UPCAST), mask=nd_ok)
    tl.store(DV + b * s_vgb + h * s_vgh + offs_n[:, None] * s_vgs + offs_d[None, :] * s_vgd,
             _to_out(dv, DV.dtype.element_ty, UPCAST), mask=nd_ok)


@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _attn_bwd_dq_kernel(
    Q, K, V, Bias, DO, LSE, Delta, DQ,
    sm_scale, qk_scale, seed, philox_offset, dropout_p,
    seq, H, D,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_db, s_dh, s_ds, s_dd,
    s_qgb, s_qgh, s_qgs, s_qgd,
    s_bb,
    SEQ_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SEQ_INTERP: tl.constexpr,
):
    """One program per query block; loops over all key blocks."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DTYPE = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=md_ok, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :] * s_dd,
                 mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * seq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The interpreter (NumPy 2.x) cannot use a runtime scalar as a range bound,
    # so there the launcher also passes the length as the constexpr SEQ_INTERP.
    for start_n in range(0, SEQ_INTERP if SEQ_INTERP > 0 else seq, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seq
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_ks + offs_d[None, :] * s_kd,
                    mask=nd_ok, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :] * s_vd,
                    mask=nd_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        bias = tl.load(Bias + b * s_bb + offs_n, mask=n_ok, other=0.0) * 1.4426950408889634
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale + bias[None, :]      # [M, N]
        valid = m_ok[:, None] & n_ok[None, :]
        p = tl.exp2(tl.where(valid, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)                               # [M, N]
        if DROPOUT:
            keep = _keep(seed, philox_offset, pid_bh, seq, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq = tl.dot(_lowp(ds, DTYPE, UPCAST), k, dq, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * s_qgb + h * s_qgh + offs_m[:, None] * s_qgs + offs_d[None, :] * s_qgd,
             _to_out(dq, DQ.dtype.element_ty, UPCAST), mask=md_ok)


# --------------------------------------------------------------------------- dropout mask (debug)


@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _keep_mask_kernel(Out, seed, philox_offset, dropout_p, seq,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_INTERP: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_base = pid_bh.to(tl.int64) * seq
    # The interpreter (NumPy 2.x) cannot use a runtime scalar as a range bound,
    # so there the launcher also passes the length as the constexpr SEQ_INTERP.
    for start_n in range(0, SEQ_INTERP if SEQ_INTERP > 0 else seq, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(seed, philox_offset, pid_bh, seq, offs_m[:, None], offs_n[None, :], dropout_p)
        ptr = Out + (row_base + offs_m[:, None]) * seq + offs_n[None, :]
        tl.store(ptr, keep.to(tl.int8), mask=(offs_m < seq)[:, None] & (offs_n < seq)[None, :])


# --------------------------------------------------------------------------- tuning

# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per dtype class
# ("lowp": fp16/bf16 operands on tensor cores; "fp32": exact fp32 dots, FMA
# code, hence small tiles).  For the dK/dV kernel BLOCK_N is the key block of a
# program and BLOCK_M the query step; for dQ the reverse.  64-wide tiles first:
# UNITER's sequences are ~50-170 tokens.
_CANDIDATES = {
    "lowp": [(64, 64, 4, 1), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2),
             (64, 64, 8, 2), (32, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
}
# Candidates removed per (kernel, dtype class, BLOCK_D): ptxas spills registers
# for them on sm_80 or sm_90 (fp16 or bf16, with or without dropout), or their
# shared memory exceeds an SM's.  From benchmarks/results/gpu_compile/report.md
# (python benchmarks/gpu_compile_report.py); tests/test_gpu_compile.py keeps
# this table and that report in step.
_EXCLUDED = {
    ('dkdv', 'fp32', 32): {(32, 16, 4, 2)},
    ('dkdv', 'fp32', 64): {(32, 32, 4, 2)},
    ('dkdv', 'fp32', 128): {(32, 32, 4, 2)},
    ('dkdv', 'lowp', 64): {(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)},
    ('dkdv', 'lowp', 128): {(64, 32, 4, 2), (64, 64, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2)},
    ('dq', 'lowp', 32): {(64, 64, 4, 1)},
    ('dq', 'lowp', 64): {(64, 64, 4, 1), (64, 64, 4, 2)},
    ('dq', 'lowp', 128): {(64, 64, 4, 1), (64, 64, 4, 2)},
    ('fwd', 'fp32', 64): {(32, 32, 4, 2)},
    ('fwd', 'fp32', 128): {(32, 16, 4, 2), (32, 32, 4, 2)},
    ('fwd', 'lowp', 32): {(64, 64, 4, 2)},
    ('fwd', 'lowp', 128): {(32, 64, 4, 2), (128, 64, 8, 2)},
}
_INTERPRET_BLOCKS = (64, 64)  # one fixed config when interpreting
_PROGRAM_BLOCK = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}


def _seq_bucket(seq: int) -> int:
    return pow2(seq)


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def _as_tuple(c: triton.Config, kernel: str):
    a = _PROGRAM_BLOCK[kernel]
    b = "BLOCK_N" if a == "BLOCK_M" else "BLOCK_M"
    return (c.kwargs[a], c.kwargs[b], c.num_warps, c.num_stages)


def tuning_candidates(kernel: str, dtype: torch.dtype) -> list:
    """The autotune configs a ``kernel`` ("fwd", "dkdv", "dq") considers for ``dtype``
    before the per-call pruning (used by the GPU compile report)."""
    return [c for c in _TUNED[kernel].configs
            if _as_tuple(c, kernel) in _CANDIDATES[dtype_class(dtype)]]


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        cls = dtype_class(named_args["Q"].dtype)
        bucket = named_args.get("SEQ_BUCKET", kwargs.get("SEQ_BUCKET"))
        excluded = _EXCLUDED.get((kernel, cls, kwargs["BLOCK_D"]), ())
        ok = [c for c in configs if _as_tuple(c, kernel) in _CANDIDATES[cls]
              and _as_tuple(c, kernel) not in excluded]
        # a program tile much larger than the sequence only wastes work
        keep = [c for c in ok if c.kwargs[_PROGRAM_BLOCK[kernel]] <= max(32, bucket)]
        return keep or sorted(ok, key=lambda c: c.kwargs[_PROGRAM_BLOCK[kernel]])[:1]
    return prune


def _configs(kernel: str):
    a = _PROGRAM_BLOCK[kernel]
    b = "BLOCK_N" if a == "BLOCK_M" else "BLOCK_M"
    tables = dict.fromkeys(t for cls in _CANDIDATES.values() for t in cls)   # union, in order
    return [triton.Config({a: x, b: y}, num_warps=w, num_stages=s) for x, y, w, s in tables]


_KEY = ["SEQ_BUCKET", "BLOCK_D", "DROPOUT", "PREC"]   # (+ the tensors' dtypes, by Triton)
_TUNED = {
    kernel: triton.autotune(_configs(kernel), key=_KEY,
                            prune_configs_by={"early_config_prune": _prune(kernel)})(fn)
    for kernel, fn in (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel),
                       ("dq", _attn_bwd_dq_kernel))
}
_fwd_tuned, _dkdv_tuned, _dq_tuned = _TUNED["fwd"], _TUNED["dkdv"], _TUNED["dq"]


def _traceable(kernel):
    """``torch.library.wrap_triton(kernel)``: the launch is then visible to torch.compile
    (inductor calls the kernel itself) and to dispatcher tracing, inside the triton_ops
    below; anything that is not a jit kernel or autotuner (the GPU compile report's
    launch recorders) is returned as it is."""
    if isinstance(kernel, _KERNEL_TYPES):
        return wrap_triton(kernel)
    return kernel


def _launch(kernel_raw, kernel_tuned, grid_block: str, grid_bh: int, seq: int,
            blocks: Optional[Tuple[int, int]], args, kwargs):
    """Run a kernel with fixed blocks (interpreter / forced) or the autotuned one."""
    if blocks is None and interpreting():
        blocks = _INTERPRET_BLOCKS
    if blocks is not None:
        bm, bn = blocks
        kw = dict(kwargs, BLOCK_M=bm, BLOCK_N=bn)
        tile = kw[grid_block]
        _traceable(kernel_raw)[(grid_bh, triton.cdiv(seq, tile))](*args, **kw)
    else:
        grid = lambda meta: (grid_bh, triton.cdiv(seq, meta[grid_block]))  # noqa: E731
        _traceable(kernel_tuned)[grid](*args, **kwargs)


# --------------------------------------------------------------------------- launchers


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    upcast = dtype == torch.bfloat16 and interpreting()
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return upcast, prec


def _block_d(head_dim: int) -> int:
    return pow2(head_dim)


def _forward(q, k, v, bias, scale, dropout_p, seed, philox_offset, blocks=None):
    B, H, S, D = q.shape
    o = torch.empty_like(q)  # keeps q's memory layout (e.g. [B, S, H, D] transposed)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    upcast, prec = _dot_flags(q.dtype)
    args = (q, k, v, bias, o, lse, scale * _LOG2E, seed, philox_offset, dropout_p, S, H, D,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), bias.stride(0), _seq_bucket(S))
    kwargs = dict(BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0.0, UPCAST=upcast, PREC=prec,
                  SEQ_INTERP=interp_bound(S))
    _launch(_attn_fwd_kernel, _fwd_tuned, "BLOCK_M", B * H, S, blocks, args, kwargs)
    return o, lse


def _backward(do, q, k, v, o, lse, bias, scale, dropout_p, seed, philox_offset, blocks=None):
    B, H, S, D = q.shape
    BLOCK_D = _block_d(D)
    delta = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    _traceable(_attn_bwd_delta_kernel)[(B * H, triton.cdiv(S, 64))](
        o, do, delta, S, H, D, *o.stride(), *do.stride(), BLOCK_M=64, BLOCK_D=BLOCK_D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    upcast, prec = _dot_flags(q.dtype)
    kwargs = dict(BLOCK_D=BLOCK_D, DROPOUT=dropout_p > 0.0, UPCAST=upcast, PREC=prec,
                  SEQ_INTERP=interp_bound(S))
    common = (scale, scale * _LOG2E, seed, philox_offset, dropout_p, S, H, D,
              *q.stride(), *k.stride(), *v.stride(), *do.stride())
    _launch(_attn_bwd_dkdv_kernel, _dkdv_tuned, "BLOCK_N", B * H, S,
            None if blocks is None else (blocks[1], blocks[0]),
            (q, k, v, bias, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
             bias.stride(0), _seq_bucket(S)), kwargs)
    _launch(_attn_bwd_dq_kernel, _dq_tuned, "BLOCK_M", B * H, S, blocks,
            (q, k, v, bias, do, lse, delta, dq, *common, *dq.stride(),
             bias.stride(0), _seq_bucket(S)), kwargs)
    return dq, dk, dv


# The kernels as registered ops (torch.library.triton_op): torch.compile traces into
# them and sees each launch (wrap_triton), eager calls run them directly; autograd is the
# backward op below.  ``block_m``/``block_n`` = 0: autotuned (or the interpreter's fixed
# blocks); otherwise the forced tiles of the tests.


def _blocks_arg(block_m: int, block_n: int) -> Optional[Tuple[int, int]]:
    return None if block_m <= 0 else (int(block_m), int(block_n))


@triton_op("uniter_fast::attention_triton", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  scale: float, dropout_p: float, seed: int, philox_offset: int,
                  block_m: int, block_n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], log-sum-exp [B, H, S] float32, log2 domain)."""
    return _forward(q, k, v, bias, scale, dropout_p, seed, philox_offset,
                    _blocks_arg(block_m, block_n))


@triton_op("uniter_fast::attention_triton_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                           bias: torch.Tensor, scale: float, dropout_p: float, seed: int,
                           philox_offset: int, block_m: int, block_n: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_attention_op`'s output."""
    return _backward(do, q, k, v, o, lse, bias, scale, dropout_p, seed, philox_offset,
                     _blocks_arg(block_m, block_n))


def _attention_setup(ctx, inputs, output):
    q, k, v, bias = inputs[:4]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias)
    ctx.args = tuple(inputs[4:])
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, bias = ctx.saved_tensors
    dq, dk, dv = torch.ops.uniter_fast.attention_triton_backward(do, q, k, v, o, lse, bias,
                                                                 *ctx.args)
    return (dq, dk, dv) + (None,) * 7


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------------------- public


def _check(q, k, v, attn_mask, dropout_p):
    """What the launchers rely on.  The full input contract (devices, mask
    dtype, scale) is checked once by :func:`uniter_fast.ops.attention`."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must be [batch, heads, seq, head_dim] of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention needs q, k, v of one dtype in fp16/bf16/fp32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(attn_mask.shape) != (q.size(0), q.size(2)):
        raise ValueError(f"attn_mask must be [batch, seq] = [{q.size(0)}, {q.size(2)}]; got "
                         f"{tuple(attn_mask.shape)}")
    if not head_dim_supported(q.size(-1)):
        raise ValueError(f"triton attention supports head_dim 1..{MAX_HEAD_DIM}; got {q.size(-1)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_launchable("triton attention", q.device)


def _new_seed() -> int:
    # drawn from torch's default CPU generator: torch.manual_seed makes it reproducible
    return int(torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64).item())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
              dropout_p: float = 0.0, scale: Optional[float] = None, *,
              seed: Optional[int] = None, philox_offset: int = 0,
              _blocks: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Fused masked self-attention; same math as the reference (inputs as
    :func:`uniter_fast.ops.attention` passes them: checked there).

    ``seed`` / ``philox_offset`` fix the dropout mask (default: a fresh seed
    from torch's generator); :func:`dropout_keep_mask` with the same values
    returns the mask used.  ``_blocks=(BLOCK_M, BLOCK_N)`` bypasses autotuning
    (for tests).
    """
    _check(q, k, v, attn_mask, dropout_p)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    if dropout_p > 0.0 and seed is None:
        seed = _new_seed()
    seed = int(seed or 0)
    if not 0 <= seed < 2 ** 31 or not 0 <= philox_offset < 2 ** 62:
        raise ValueError(f"seed / philox_offset out of range: {seed}, {philox_offset}")
    # additive key bias, fp32 [batch, seq]: (1 − mask) · −10000, same as the reference
    bias = ((1.0 - attn_mask.to(torch.float32)) * ATTENTION_MASK_VALUE).contiguous()
    if q.numel() == 0:
        return _EmptyAttention.apply(q, k, v)
    bm, bn = _blocks or (0, 0)
    return torch.ops.uniter_fast.attention_triton(q, k, v, bias, scale, float(dropout_p), seed,
                                                  int(philox_offset), bm, bn)[0]


class _EmptyAttention(torch.autograd.Function):
    """Zero-size inputs: nothing to launch, gradients are empty too."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        return torch.zeros_like(do), torch.zeros_like(do), torch.zeros_like(do)


def dropout_keep_mask(batch: int, heads: int, seq: int, dropout_p: float, seed: int,
                      philox_offset: int = 0, device="cuda") -> torch.Tensor:
    """The kernel's dropout keep-mask, [batch, heads, seq, seq] bool (True = keep),
    generated with the same Philox counters as the attention kernels."""
    out = torch.empty((batch, heads, seq, seq), dtype=torch.int8, device=device)
    if out.numel():
        # 8 warps: with 4, the 64 x 64 Philox tile spills registers (GPU compile report)
        _keep_mask_kernel[(batch * heads, triton.cdiv(seq, 64))](
            out, int(seed), int(philox_offset), float(dropout_p), seq, BLOCK_M=64, BLOCK_N=64,
            SEQ_INTERP=interp_bound(seq), num_warps=8)
    return out.bool()
