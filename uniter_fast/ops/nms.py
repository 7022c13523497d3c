"""Public non-maximum suppression ops (reference twins in :mod:`uniter_fast.reference`).

Contract: ``nms(boxes, scores, iou_threshold)``: floating ``boxes`` [N, 4] (x1, y1, x2, y2),
finite; floating ``scores`` [N] without NaN on the boxes' device; ``iou_threshold`` a number
in [0, 1].  ``batched_nms`` adds ``idxs``, an integer tensor [N] of categories on the same
device.  Both return int64 indices of the kept boxes in decreasing score order, with
torchvision's semantics (see :mod:`uniter_fast.reference.detection`).

Backends:

* ``torchvision`` (priority 10, where ``import torchvision`` works and its ``nms`` kernel is
  registered for the device): ``torch.ops.torchvision.nms``; float32/float64 with scores of
  the boxes' dtype (it declines other calls, which then run on the reference).
  ``batched_nms`` runs that kernel once per category and orders the union like the
  reference (decreasing score, equal scores by index), so it is exact, unlike
  torchvision's coordinate-offset trick.
* ``reference`` (everywhere): blocked IoU matrix and a greedy pass, plain PyTorch.

Where they may differ: torchvision sorts scores without asking for a stable sort, so boxes of
equal score may be visited in another order than the reference's (lower index first); its
CUDA kernel compares the IoU with the threshold rounded to float32 (its CPU kernel and the
reference compare with the threshold as a double).  Neither matters for distinct scores and a
threshold exact in float32 (0.5 is; 0.7 is not).
"""
import functools
import numbers
from typing import Optional

import torch

from . import _registry

Reason = Optional[str]

#: dtypes torchvision's detection kernels take (its CPU kernels: only these)
TORCHVISION_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _torchvision_import_error() -> Reason:
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError: built for another torch
        return f"torchvision does not import ({type(e).__name__}: {e})"
    return None


def torchvision_kernel_missing(kernel: str, device: torch.device, dtype: torch.dtype) -> Reason:
    """``available=`` predicate of a torchvision backend: None when ``import torchvision``
    succeeds and ``torch.ops.torchvision.<kernel>`` exists (and has a kernel for the
    device), else the reason."""
    if dtype not in TORCHVISION_DTYPES:
        return f"torchvision's kernels take float32/float64, got {dtype}"
    reason = _torchvision_import_error()
    if reason is not None:
        return reason
    try:
        getattr(torch.ops.torchvision, kernel)
    except Exception as e:
        return f"torch.ops.torchvision.{kernel} does not exist ({type(e).__name__}: {e})"
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{kernel}",
                                                            device.type.upper())
    except Exception:   # a private query: when it is not there, let the call decide
        has = True
    if not has:
        return f"torchvision::{kernel} has no {device.type.upper()} kernel in this build"
    return None


def _tv_nms_available(device: torch.device, dtype: torch.dtype) -> Reason:
    return torchvision_kernel_missing("nms", device, dtype)


def _tv_accepts(call: _registry.Call) -> Reason:
    boxes, scores = call.get("boxes"), call.get("scores")
    if boxes is not None and scores is not None and scores.dtype != boxes.dtype:
        return f"needs scores of the boxes' dtype ({boxes.dtype}), got {scores.dtype}"
    return None


def _ref_nms():
    from ..reference import nms
    return nms


def _ref_batched():
    from ..reference import batched_nms
    return batched_nms


def _tv_nms(boxes, scores, iou_threshold):
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def _tv_batched(boxes, scores, idxs, iou_threshold):
    """torchvision's kernel per category, the union ordered like the reference."""
    if boxes.size(0) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for c in torch.unique(idxs):
        members = (idxs == c).nonzero().squeeze(1)
        kept.append(members[torch.ops.torchvision.nms(boxes[members], scores[members],
                                                      iou_threshold)])
    kept = torch.cat(kept).sort().values                              # by index, then
    return kept[torch.sort(scores[kept], descending=True, stable=True)[1]]   # by score


_registry.register("nms", "reference", _ref_nms, priority=0)
_registry.register("nms", "torchvision", lambda: _tv_nms, available=_tv_nms_available,
                   priority=10, accepts=_tv_accepts)
_registry.register("batched_nms", "reference", _ref_batched, priority=0)
_registry.register("batched_nms", "torchvision", lambda: _tv_batched,
                   available=_tv_nms_available, priority=10, accepts=_tv_accepts)


# ----------------------------------------------------------------- input contract

def _describe(t) -> str:
    return (f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
            else type(t).__name__)


def check_boxes(op: str, boxes, scores, iou_threshold) -> float:
    """The contract of the NMS ops' boxes, scores and threshold; returns the threshold
    as a float."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"{op}: boxes must be a [N, 4] tensor (x1, y1, x2, y2); got "
                         f"{_describe(boxes)}")
    n = boxes.size(0)
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        raise ValueError(f"{op}: scores must be a [N] tensor with N = {n} as boxes; got "
                         f"{_describe(scores)}")
    for name, t in (("boxes", boxes), ("scores", scores)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if scores.device != boxes.device:
        raise ValueError(f"{op}: scores are on {scores.device}, boxes on {boxes.device}; "
                         "expected the same device")
    if (isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real)
            or not 0.0 <= float(iou_threshold) <= 1.0):
        raise ValueError(f"{op}: iou_threshold must be a number in [0, 1]; got "
                         f"{iou_threshold!r}")
    if n:
        bad = ~torch.isfinite(boxes).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: boxes must be finite; got {int(bad.sum())} box(es) with "
                             f"inf/NaN coordinates (first: index {i}, "
                             f"{boxes[i].tolist()})")
        if bool(torch.isnan(scores).any()):
            raise ValueError(f"{op}: scores must not be NaN; got "
                             f"{int(torch.isnan(scores).sum())} NaN score(s)")
    return float(iou_threshold)


# ----------------------------------------------------------------- public ops

def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *,
        backend: Optional[str] = None) -> torch.Tensor:
    """Greedy non-maximum suppression: int64 indices of the kept boxes [N, 4], decreasing
    score; a box is dropped when its IoU with a kept box of higher score is
    > ``iou_threshold``."""
    thr = check_boxes("nms", boxes, scores, iou_threshold)
    fn = _registry.resolve("nms", backend, boxes.device, boxes.dtype,
                           boxes=boxes, scores=scores)
    return fn(boxes, scores, thr)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`nms` independently per category ``idxs`` [N] (integers): int64 indices of the
    boxes kept in any category, decreasing score (equal scores: lower index first)."""
    thr = check_boxes("batched_nms", boxes, scores, iou_threshold)
    n = boxes.size(0)
    if not isinstance(idxs, torch.Tensor) or idxs.shape != (n,):
        raise ValueError(f"batched_nms: idxs must be a [N] tensor with N = {n} as boxes; got "
                         f"{_describe(idxs)}")
    if idxs.dtype.is_floating_point or idxs.dtype.is_complex or idxs.dtype == torch.bool:
        raise TypeError(f"batched_nms: idxs must be an integer tensor (category per box), "
                        f"got {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"batched_nms: idxs are on {idxs.device}, boxes on {boxes.device}; "
                         "expected the same device")
    fn = _registry.resolve("batched_nms", backend, boxes.device, boxes.dtype,
                           boxes=boxes, scores=scores)
    return fn(boxes, scores, idxs, thr)

