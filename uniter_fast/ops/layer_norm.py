"""Public layer-norm and GELU ops (reference twins in :mod:`uniter_fast.reference`).

Contract: ``layer_norm(x, weight, bias, eps)``: floating x, weight and bias of shape
[x.size(-1)] on x's device, eps > 0; ``gelu(x)`` on any floating tensor (a TypeError
naming the argument otherwise).
Neither looks at shapes when choosing a backend, so a call resolves from the
registry's cache.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import LAYER_NORM_EPS
from . import _registry


def _ref_ln():
    from ..reference import layer_norm
    return layer_norm


def _ref_gelu():
    from ..reference import gelu
    return gelu


def _torch_ln(x, weight, bias, eps):
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def _torch_gelu(x):
    return F.gelu(x, approximate="none")


_registry.register("layer_norm", "reference", _ref_ln, priority=0)
_registry.register("layer_norm", "torch", lambda: _torch_ln, priority=10)
_registry.register("gelu", "reference", _ref_gelu, priority=0)
_registry.register("gelu", "torch", lambda: _torch_gelu, priority=10)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = LAYER_NORM_EPS, *, backend: Optional[str] = None) -> torch.Tensor:
    """Layer norm over the last dimension (UNITER: eps = 1e-12)."""
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"layer_norm {name} must be a floating tensor, got {got}"
                            + (" (token ids? embed them first)" if name == "input" else ""))
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"layer_norm weight/bias on {weight.device}/{bias.device}, input on "
                         f"{x.device}")
    if weight.shape != (x.size(-1),) or bias.shape != (x.size(-1),):
        raise ValueError(f"layer_norm weight/bias must be [{x.size(-1)}]; got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if not eps > 0:
        raise ValueError(f"layer_norm eps must be > 0, got {eps}")
    return _registry.resolve("layer_norm", backend, x.device, x.dtype)(x, weight, bias, eps)


def gelu(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """GELU, erf form."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"gelu input must be a floating tensor, got {got}")
    return _registry.resolve("gelu", backend, x.device, x.dtype)(x)
