"""Public RoI max-pooling op (reference twin in :mod:`uniter_fast.reference`).

Contract: ``roi_pool(input, rois, output_size, spatial_scale=1.0)``: floating ``input``
[B, C, H, W]; floating ``rois`` [K, 5] rows (batch index, x1, y1, x2, y2) on the input's
device, finite, the batch index an integer in [0, B); ``output_size`` a positive int or a
pair (ph, pw) of them; ``spatial_scale`` > 0 (1/16 for a stride-16 map).  Returns
[K, C, ph, pw] in the input's dtype with the semantics of ``torchvision.ops.roi_pool``
(Caffe's ROIPooling; see :mod:`uniter_fast.reference.detection`).

Backends:

* ``torchvision`` (priority 10, where ``import torchvision`` works and its ``roi_pool`` kernel
  is registered for the device): ``torch.ops.torchvision.roi_pool``, float32/float64 with
  rois of the input's dtype (it declines other calls, which then run on the reference);
  differentiable.
* ``reference`` (everywhere, any floating dtype): sliding-window maxima built by doubling,
  read at each bin's corner; bit-identical to torchvision's kernel (a maximum); inference
  only (its result never requires grad).
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _registry
from .nms import torchvision_kernel_missing

Reason = Optional[str]


def _tv_available(device: torch.device, dtype: torch.dtype) -> Reason:
    return torchvision_kernel_missing("roi_pool", device, dtype)


def _tv_accepts(call: _registry.Call) -> Reason:
    x, rois = call.get("input"), call.get("rois")
    if x is not None and rois is not None and rois.dtype != x.dtype:
        return f"needs rois of the input's dtype ({x.dtype}), got {rois.dtype}"
    return None


def _ref_roi_pool():
    from ..reference import roi_pool
    return roi_pool


def _tv_roi_pool(input, rois, output_size, spatial_scale):
    return torch.ops.torchvision.roi_pool(input, rois, spatial_scale, *output_size)[0]


_registry.register("roi_pool", "reference", _ref_roi_pool, priority=0)
_registry.register("roi_pool", "torchvision", lambda: _tv_roi_pool, available=_tv_available,
                   priority=10, accepts=_tv_accepts)


def _describe(t) -> str:
    return (f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
            else type(t).__name__)


def _output_size(output_size) -> Tuple[int, int]:
    pair = (output_size, output_size) if not isinstance(output_size, (tuple, list)) \
        else tuple(output_size)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 and v > 0 for v in pair):
        raise ValueError(f"roi_pool: output_size must be a positive int or a pair (ph, pw) of "
                         f"positive ints; got {output_size!r}")
    return int(pair[0]), int(pair[1])


def roi_pool(input: torch.Tensor, rois: torch.Tensor,
             output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """Max-pool each RoI of ``rois`` [K, 5] (batch index, x1, y1, x2, y2, in input-image
    coordinates scaled by ``spatial_scale``) of ``input`` [B, C, H, W] into an
    ``output_size`` grid: [K, C, ph, pw]."""
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"roi_pool: input must be a [B, C, H, W] tensor; got "
                         f"{_describe(input)}")
    if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.size(1) != 5:
        raise ValueError(f"roi_pool: rois must be a [K, 5] tensor (batch index, x1, y1, x2, "
                         f"y2); got {_describe(rois)}")
    for name, t in (("input", input), ("rois", rois)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"roi_pool: {name} must be a floating tensor, got {t.dtype}")
    if rois.device != input.device:
        raise ValueError(f"roi_pool: rois are on {rois.device}, input on {input.device}; "
                         "expected the same device")
    size = _output_size(output_size)
    if (isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real)
            or not math.isfinite(float(spatial_scale)) or not float(spatial_scale) > 0):
        raise ValueError(f"roi_pool: spatial_scale must be a finite number > 0; got "
                         f"{spatial_scale!r}")
    if rois.size(0):
        bad = ~torch.isfinite(rois).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"roi_pool: rois must be finite; got {int(bad.sum())} row(s) with "
                             f"inf/NaN (first: index {i}, {rois[i].tolist()})")
        b = rois[:, 0]
        wrong = (b != torch.trunc(b)) | (b < 0) | (b >= input.size(0))
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            raise ValueError(f"roi_pool: rois[:, 0] must be batch indices, integers in "
                             f"[0, {input.size(0)}); got {b[i].item()!r} at row {i}")
    fn = _registry.resolve("roi_pool", backend, input.device, input.dtype,
                           input=input, rois=rois)
    return fn(input, rois, size, float(spatial_scale))
