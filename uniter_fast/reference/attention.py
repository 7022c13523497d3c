"""Reference self-attention: UNITER's exact math in plain PyTorch."""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import ATTENTION_MASK_VALUE


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor, dropout_p: float = 0.0,
              scale: Optional[float] = None, *,
              dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + (1 − mask) · −10000) [dropout] v.

    q, k, v: [batch, heads, seq, head_dim]; attn_mask: [batch, seq] with
    1 = real token (UNITER's ``attn_masks``; bool, uint8, int or float).
    ``scale`` defaults to 1/sqrt(head_dim).  ``dropout_mask`` (optional,
    [batch, heads, seq, seq], True = keep) replays a given dropout pattern,
    so a fused kernel's mask can be checked against this reference.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    ext = attn_mask[:, None, None, :].to(scores.dtype)
    scores = scores + (1.0 - ext) * ATTENTION_MASK_VALUE
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)
