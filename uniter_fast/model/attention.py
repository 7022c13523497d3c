"""Multi-head attention and attention pooling for UNITER's NLVR2 paired-attn head,
drop-in for the original's ``model/attention.py`` (and ``AttentionPool`` of ``model/nlvr2.py``).

:class:`MultiheadAttention` has the parameters of the (pre-1.2) ``torch.nn.MultiheadAttention``
that UNITER vendored — ``in_proj_weight`` [3E, E], ``in_proj_bias`` [3E], ``out_proj`` —
registered in the same order, so the original's state dicts load with ``strict=True``.
Inputs are sequence-first ([L, N, E]) and ``key_padding_mask`` is True at padded keys,
as in the original.  When the attention weights are not requested and query and key
have the same length, the product runs through :func:`uniter_fast.ops.attention` (the
fused kernels); otherwise a plain PyTorch path computes it.  Padded keys get an additive
−10000 (UNITER's encoder convention) instead of −inf: the same numbers whenever a query
sees at least one real key, and finite (uniform) weights instead of NaN when it sees none.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_

from .. import ops
from ..constants import ATTENTION_MASK_VALUE

__all__ = ["MultiheadAttention", "AttentionPool", "MASK_FILL"]

#: additive score of a masked key / pooled position (UNITER uses −10000 in the encoder
#: and −1e4 in ``AttentionPool``)
MASK_FILL = ATTENTION_MASK_VALUE


class MultiheadAttention(nn.Module):
    """``MultiheadAttention(embed_dim, num_heads, dropout=0., bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None)`` with the original's parameters and
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None)``
    → ``(attn_output [L, N, E], head-averaged weights [N, L, S] or None)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0., bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        # registration order = the original's state-dict order
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.)
            constant_(self.out_proj.bias, 0.)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def _project(self, x: torch.Tensor, i: int) -> torch.Tensor:
        e = self.embed_dim
        b = None if self.in_proj_bias is None else self.in_proj_bias[i * e:(i + 1) * e]
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight[i * e:(i + 1) * e]
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[i]
        return F.linear(x, w, b)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        tgt_len, bsz, e = query.shape
        if e != self.embed_dim:
            raise ValueError(f"query has embed dim {e}, expected {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.size(1) != bsz:
            raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match "
                             f"query {tuple(query.shape)} ([seq, batch, dim])")
        src_len = key.size(0)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(f"key_padding_mask must be [batch={bsz}, src_len={src_len}], "
                             f"got {tuple(key_padding_mask.shape)}")
        h, d = self.num_heads, self.head_dim
        q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        keep = (torch.ones(bsz, src_len, dtype=torch.bool, device=query.device)
                if key_padding_mask is None else ~key_padding_mask.bool())
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, e)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, e)])
            keep = F.pad(keep, (0, 1), value=True)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        # [seq, N, E] -> [N, heads, seq, head_dim]
        q, k, v = (t.reshape(t.size(0), bsz, h, d).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
            keep = F.pad(keep, (0, 1), value=True)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        p = self.dropout if self.training else 0.0
        weights = None
        if not need_weights and attn_mask is None and k.size(2) == tgt_len:
            ctx = ops.attention(q, k, v, keep, dropout_p=p)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            if attn_mask is not None:
                scores = scores + attn_mask.to(scores.dtype)
            scores = scores + (~keep)[:, None, None, :].to(scores.dtype) * MASK_FILL
            probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=p > 0)
            if need_weights:   # averaged over heads, after dropout (as the original)
                weights = probs.sum(dim=1) / h
            ctx = probs @ v
        out = ctx.permute(2, 0, 1, 3).reshape(tgt_len, bsz, e)
        return self.out_proj(out), weights


class AttentionPool(nn.Module):
    """Attention pooling (UNITER's ``AttentionPool``): ``fc`` = Linear(hidden, 1) + ReLU
    scores each position, masked positions (``mask`` True) get −1e4, softmax over the
    sequence, dropout, weighted sum.  ``forward(input_ [B, T, D], mask [B, T]) -> [B, D]``.
    """

    def __init__(self, hidden_size: int, drop: float = 0.0):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(drop)

    def forward(self, input_: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        score = self.fc(input_).squeeze(-1)
        if mask is not None:
            score = score + mask.to(dtype=input_.dtype) * MASK_FILL
        norm_score = self.dropout(F.softmax(score, dim=1))
        return norm_score.unsqueeze(1).matmul(input_).squeeze(1)
