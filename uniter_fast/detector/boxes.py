"""Box arithmetic of the detector: anchors, delta decoding, clipping, and the box selection of
the original bottom-up-attention extraction (per-class NMS, then UNITER's confidence rule).

Boxes are ``(x1, y1, x2, y2)`` in pixels, widths ``x2 - x1`` (detectron2's convention, no +1).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..reference.detection import box_iou

__all__ = ["cell_anchors", "grid_anchors", "apply_deltas", "clip_boxes", "class_nms_max_conf",
           "select_boxes"]


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """The anchors of one feature-map cell, centred on 0: ``[len(sizes) * len(ratios), 4]``,
    size-major (detectron2's order, the order of the RPN's output channels): a size ``s`` and
    ratio ``a = h / w`` give ``w = sqrt(s² / a)``, ``h = a · w``."""
    out = []
    for s in sizes:
        for a in ratios:
            w = math.sqrt(float(s) ** 2 / float(a))
            h = float(a) * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(cells: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Every anchor of a ``height x width`` feature map: ``[height * width * A, 4]``, ordered
    (y, x, anchor) as the RPN's flattened outputs."""
    dev = cells.device
    ys = torch.arange(height, device=dev, dtype=torch.float32) * stride
    xs = torch.arange(width, device=dev, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.float().reshape(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor,
                 weights: Tuple[float, float, float, float], scale_clamp: float) -> torch.Tensor:
    """Decode ``deltas`` [N, 4k] (dx, dy, dw, dh per class) against ``boxes`` [N, 4]: centre
    moved by (dx·w, dy·h) / (wx, wy), size scaled by exp(min(dw / ww, clamp)).  float32."""
    deltas = deltas.float()
    boxes = boxes.float()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    pcx = dx * w[:, None] + cx[:, None]
    pcy = dy * h[:, None] + cy[:, None]
    pw = torch.exp(dw) * w[:, None]
    ph = torch.exp(dh) * h[:, None]
    out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Boxes [N, 4k] clipped to the image ``[0, width] x [0, height]``."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(min=0, max=width)
    out[:, 1::2] = out[:, 1::2].clamp(min=0, max=height)
    return out


def class_nms_max_conf(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                       top: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The original extraction's confidence of every box (``max_conf`` of
    ``generate_tsv.py``): NMS runs per class over all boxes with that class's scores, and a
    box's confidence is its highest score among the classes whose NMS kept it.

    ``boxes`` [R, 4] (the same boxes for every class: the RPN proposals), ``scores`` [R, K]
    (the foreground classes only).  Returns ``(conf [R] float32, cls [R] int64)``: ``cls`` is
    the class whose kept score is ``conf`` (the box's arg-max class when no class kept it).
    Exact greedy NMS, all classes at once: one IoU matrix, then steps over the boxes in each
    class's score order.

    ``top``: only the ``top`` most confident boxes are wanted (UNITER's ``max_bb``).  Every
    class's first box is kept, so the ``top``-th largest of those first scores, ``L``, is at
    most the ``top``-th largest confidence; a (box, class) pair scoring below ``L`` can neither
    give one of the ``top`` confidences nor suppress a pair above it (NMS only suppresses
    downwards), so such pairs are left out.  The confidences of the ``top`` boxes, their
    order and every count of confidences above a threshold >= ``L`` are then exact; a box
    below them may get a lower confidence (0) than the full computation gives.
    """
    r, k = scores.shape
    if r == 0 or k == 0:
        return (torch.zeros(r, dtype=torch.float32, device=scores.device),
                torch.zeros(r, dtype=torch.long, device=scores.device))
    scores = scores.float()
    over = box_iou(boxes, boxes) > iou_threshold                      # [R, R]
    # each class's boxes in decreasing score order (stable: ties keep the lower index first)
    srt = torch.sort(scores.t(), dim=1, descending=True, stable=True)
    order, ranked = srt.indices, srt.values                          # [K, R]
    active = torch.ones_like(ranked, dtype=torch.bool)
    if top is not None and 0 < top < r:
        first = torch.zeros(r, dtype=torch.float32, device=scores.device)
        first.scatter_reduce_(0, order[:, 0], ranked[:, 0], reduce="amax")
        if int((first > 0).sum()) >= top:
            low = torch.topk(first, top).values[-1]
            active = ranked >= low
    steps = int(active.sum(1).max())
    classes = torch.nonzero(active[:, 0]).flatten()                  # classes with any pair
    order, active = order[classes], active[classes]
    kc = classes.numel()
    suppressed = torch.zeros(kc, r, dtype=torch.bool, device=scores.device)
    kept = torch.zeros(kc, r, dtype=torch.bool, device=scores.device)
    rows = torch.arange(kc, device=scores.device)
    for step in range(steps):
        b = order[:, step]                                            # the box at this rank
        keep = ~suppressed[rows, b] & active[:, step]
        kept[rows, b] = keep
        suppressed |= keep[:, None] & over[b]
    full = torch.zeros(k, r, dtype=torch.bool, device=scores.device)
    full[classes] = kept
    conf, cls = torch.where(full.t(), scores, torch.full((), -1.0, device=scores.device)).max(1)
    # a box that every class's NMS suppressed has confidence 0 (the original's initial value)
    none = conf < 0
    return conf.clamp(min=0), torch.where(none, scores.argmax(1), cls)


def select_boxes(conf: torch.Tensor, conf_th: float, min_bb: int, max_bb: int) -> torch.Tensor:
    """Indices of the boxes to keep, by decreasing confidence (stable order on ties): UNITER's
    box rule (``convert_imgdir.py``, :func:`uniter_fast.data.db.compute_num_bb`): the boxes of
    confidence ``> conf_th``, at least ``min_bb`` and at most ``max_bb`` of them (fewer only
    when the image has fewer boxes).  ``conf_th == -1``: the first ``max_bb`` (a fixed
    ``num_bb``)."""
    order = torch.sort(conf, descending=True, stable=True).indices
    if conf_th == -1:
        n = int(max_bb)
    else:
        n = min(max(int((conf > conf_th).sum()), int(min_bb)), int(max_bb))
    return order[:min(n, conf.numel())]
