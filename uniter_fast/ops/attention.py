"""Public attention op: ``attention(q, k, v, attn_mask, dropout_p=0.0, scale=None, *, backend="auto")``."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _registry

OP = "attention"


def _sdpa(q, k, v, attn_mask, dropout_p=0.0, scale=None):
    """torch SDPA with UNITER's additive key-padding mask, (1 − mask)·−10000."""
    add = (1.0 - attn_mask[:, None, None, :].to(q.dtype)) * -10000.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=dropout_p,
                                          scale=scale)


def _float_only(device, dtype):
    if not dtype.is_floating_point:
        return f"needs a floating dtype, got {dtype}"
    return None


def _reference():
    from ..reference import attention
    return attention


# --- triton: fused FlashAttention-2-style kernel (kernels/attention_triton.py)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 128  # same limit as the kernel; larger heads fall back under "auto"


def _triton_available(device, dtype):
    return _registry.triton_available(device, dtype, TRITON_DTYPES)


def _triton(q, k, v, attn_mask, dropout_p=0.0, scale=None):
    from uniter_fast.kernels import attention_triton
    return attention_triton.attention(q, k, v, attn_mask, dropout_p, scale)


_registry.register(OP, "reference", _reference, available=_float_only, priority=0)
_registry.register(OP, "sdpa", lambda: _sdpa, available=_float_only, priority=10)
_registry.register(OP, "triton", lambda: _triton, available=_triton_available, priority=20,
                   auto=_registry.on_cuda)


def check_inputs(q, k, v, attn_mask):
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; q has shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if attn_mask.dim() != 2 or attn_mask.size(0) != q.size(0) or attn_mask.size(1) != q.size(2):
        raise ValueError(f"attn_mask must be [batch, seq] = [{q.size(0)}, {q.size(2)}]; "
                         f"got {tuple(attn_mask.shape)}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
              dropout_p: float = 0.0, scale: Optional[float] = None, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Masked self-attention, [batch, heads, seq, head_dim] → same.

    attn_mask [batch, seq], 1 = real token.  ``dropout_p`` is applied as
    given (pass 0 in eval).  ``backend``: "auto" (default; honours
    :func:`use_backend`), "reference", "sdpa", "triton", ...
    """
    check_inputs(q, k, v, attn_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    fn = _registry.resolve(OP, backend, q.device, q.dtype)
    if fn is _triton and not 1 <= q.size(-1) <= TRITON_MAX_HEAD_DIM:
        if (backend or "auto") == "auto" and _registry.current_backend(OP) == "auto":
            fn = _registry.resolve(OP, "sdpa", q.device, q.dtype)  # head too wide for the kernel
        else:
            raise ValueError(f"backend 'triton' supports head_dim 1..{TRITON_MAX_HEAD_DIM}, "
                             f"got {q.size(-1)}")
    return fn(q, k, v, attn_mask, dropout_p, scale)
