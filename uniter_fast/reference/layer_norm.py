"""Reference layer norm and GELU (erf form), written out explicitly."""
import math

import torch

from ..constants import LAYER_NORM_EPS


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over the last dim
    (biased variance; computed in float32 for float16/bfloat16/float32 inputs and in
    float64 for a float64 input)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    return (y * weight.to(ct) + bias.to(ct)).to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """x · ½ · (1 + erf(x / √2)), as in UNITER/BERT."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
