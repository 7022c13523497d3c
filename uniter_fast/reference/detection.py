"""Reference detection ops: box IoU, greedy NMS (plain and per category) and RoI max pooling.

Plain PyTorch, no torchvision.  ``nms``, ``batched_nms`` and ``roi_pool`` compute what
torchvision's CPU kernels compute (``torchvision.ops.nms`` / ``roi_pool``, Caffe's
ROIPooling), bit for bit on float32 and float64 inputs:

* NMS: boxes (x1, y1, x2, y2), area (x2 − x1)·(y2 − y1) with no "+1"; greedy in decreasing
  score order (ties: lower index first), a box is suppressed when its IoU with a kept box is
  strictly greater than ``iou_threshold`` (the float IoU compared with the threshold as a
  double); the kept indices come back in decreasing score order.
* RoI pooling: the RoI's corners rounded half away from zero after scaling, its size at least
  1×1, bin edges floor(i·bin) / ceil((i+1)·bin) with bin = size / pooled in the coordinates'
  float type, clipped to the map; an empty bin gives 0, any other the maximum over the bin
  (NaN never wins; the maximum is at least −FLT_MAX, as the kernels start from it).

float16/bfloat16 coordinates are computed in float32 (torchvision's CPU kernels take only
float32/float64).  Neither op is differentiable here: inference only.
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch

# rows of the IoU matrix computed at once by the NMS loops: about this many entries
_NMS_BLOCK_ENTRIES = 1 << 22
# integers beyond this are far outside any feature map; clamping keeps float -> int64 defined
_INT_LIMIT = float(1 << 40)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything narrower (and for integer boxes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _overlap(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas [N, M] of boxes already in their compute dtype, in the
    order of torchvision's NMS: union = (area_a + area_b) − inter."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(a[:, None, 2], b[None, :, 2])
         - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_min_(0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3])
         - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_min_(0)
    inter = w.mul_(h)
    return inter, area_a[:, None] + area_b[None, :] - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] -> [N, M].

    Boxes are (x1, y1, x2, y2), area (x2 − x1)·(y2 − y1); computed in float32 (float64 for
    float64 boxes) in the order torchvision's NMS uses: inter / (area_a + area_b − inter).
    A pair whose union is not positive (empty or inverted boxes) has IoU 0, never NaN.
    """
    ct = _compute_dtype(torch.promote_types(a.dtype, b.dtype))
    inter, union = _overlap(a.to(ct), b.to(ct))
    ok = union > 0
    return torch.where(ok, inter / torch.where(ok, union, 1.0), 0.0)


def _below(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value <= ``threshold``: for x of that dtype,
    x > threshold (compared as doubles, as torchvision's CPU kernel does) exactly when
    x > _below(threshold) compared in ``dtype``."""
    if dtype == torch.float64:
        return threshold
    t = np.float32(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def _greedy(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
            idxs: Union[torch.Tensor, None]) -> torch.Tensor:
    """Greedy NMS in decreasing score order; only boxes of the same ``idxs`` value suppress
    each other when ``idxs`` is given.  Returns kept indices, decreasing score."""
    n = boxes.size(0)
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    with torch.no_grad():
        order = torch.sort(scores.detach(), descending=True, stable=True)[1]
        ct = _compute_dtype(boxes.dtype)
        sboxes = boxes.detach()[order].to(ct)
        limit = _below(iou_threshold, ct)
        scat = idxs[order] if idxs is not None else None
        suppressed = np.zeros(n, dtype=bool)
        keep = []
        block = max(64, _NMS_BLOCK_ENTRIES // n)
        for s in range(0, n, block):
            e = min(n, s + block)
            if suppressed[s:e].all():
                continue
            # rows s..e-1 against columns s..n-1 (earlier columns are decided already).
            # inter / union as torchvision computes it: NaN (0 / 0) and a non-positive
            # union never pass the threshold, as there
            inter, union = _overlap(sboxes[s:e], sboxes[s:])
            over = inter.div_(union) > limit
            if scat is not None:
                over &= scat[s:e, None] == scat[None, s:]
            over = over.cpu().numpy()
            tail = suppressed[s:]
            for r in range(e - s):
                if tail[r]:
                    continue
                keep.append(s + r)
                tail |= over[r]
        kept = torch.as_tensor(keep, dtype=torch.int64, device=device)
        return order[kept]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes [N, 4] that greedy non-maximum suppression keeps,
    in decreasing score order: visit boxes by decreasing score (equal scores: lower index
    first), keep a box unless a kept box overlaps it with IoU > ``iou_threshold``.
    The IoU matrix is built in row blocks of the score-sorted boxes, so memory stays
    bounded; N = 0 gives an empty tensor."""
    return _greedy(boxes, scores, float(iou_threshold), None)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """:func:`nms` independently per category ``idxs`` [N] (boxes of different categories
    never suppress each other; exact: the IoU is that of the boxes themselves, no
    coordinate offsets).  Returns the kept indices of all categories in decreasing score
    order (equal scores: lower index first)."""
    return _greedy(boxes, scores, float(iou_threshold), idxs.detach())


# ----------------------------------------------------------------- RoI pooling

def _pair(output_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    ph, pw = output_size
    return int(ph), int(pw)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves away from zero (torch.round rounds them to even).  Exact:
    v − trunc(v) is exact in floating point, so no v + 0.5 rounding error."""
    t = torch.trunc(v)
    frac = v - t
    return t + torch.sign(v) * (frac.abs() >= 0.5).to(v.dtype)


def _to_int(v: torch.Tensor) -> torch.Tensor:
    """float -> int64, truncating like a C cast (values clamped far outside any map first)."""
    return v.clamp(-_INT_LIMIT, _INT_LIMIT).to(torch.int64)


def _bin_edges(start: torch.Tensor, end: torch.Tensor, pooled: int, size: int,
               ct: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per RoI [K] rounded start/end -> bin starts and ends [K, pooled], clipped to [0, size]."""
    extent = (end - start + 1).clamp_min(1)
    bin_size = extent.to(ct) / torch.tensor(float(pooled), dtype=ct, device=extent.device)
    i = torch.arange(pooled, dtype=ct, device=extent.device)
    lo = _to_int(torch.floor(i[None, :] * bin_size[:, None])) + start[:, None]
    hi = _to_int(torch.ceil((i + 1)[None, :] * bin_size[:, None])) + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _halve_max(t: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """max(t[j], t[j + step]) along ``dim``: windows of 2·step from windows of step."""
    n = t.size(dim)
    return torch.maximum(t.narrow(dim, 0, n - step), t.narrow(dim, step, n - step))


def _window_levels(x: torch.Tensor, dim: int, top: int) -> list:
    """[x, max over 2 along dim, over 4, ..., over 2**top] (stride 1, each one shorter)."""
    levels = [x]
    for lv in range(1, top + 1):
        levels.append(_halve_max(levels[-1], dim, 1 << (lv - 1)))
    return levels


def roi_pool(input: torch.Tensor, rois: torch.Tensor,
             output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0) -> torch.Tensor:
    """RoI max pooling of ``input`` [B, C, H, W] over ``rois`` [K, 5] rows
    (batch index, x1, y1, x2, y2) -> [K, C, ph, pw] in the input's dtype, with the
    semantics of torchvision's ``roi_pool`` (see the module docstring; the batch index is
    truncated to an integer like a C cast).

    Not per RoI and bin: a bin of h rows and w columns starting at (r, c) is the maximum of
    a sliding h×w window at (r, c).  Per image the map is put channels-last; sliding maxima
    over 1, 2, 4, ... columns are built by doubling, the exact width w of each bin width
    present is two of them combined (one pass over the map), then the same over rows, and a
    bin reads two rows of that map (one gather of C values each).  The cost is a few dozen
    elementwise passes over the map plus the output; it does not grow with the bin area.

    Inference only: the result is computed without autograd (it does not require grad even
    when ``input`` does).
    """
    ph, pw = _pair(output_size)
    bsz, chans, height, width = input.shape
    k = rois.size(0)
    with torch.no_grad():
        x = input.detach()
        out = x.new_empty((k * ph * pw, chans))        # one row per bin, channels last
        if out.numel() == 0:
            return out.view(k, ph, pw, chans).permute(0, 3, 1, 2).contiguous()
        ct = _compute_dtype(x.dtype)
        r = rois.detach().to(ct)
        batch = _to_int(r[:, 0])
        corners = _to_int(_round_half_away(
            r[:, 1:] * torch.tensor(spatial_scale, dtype=ct, device=r.device)))
        hs, he = _bin_edges(corners[:, 1], corners[:, 3], ph, height, ct)    # [K, ph]
        ws, we = _bin_edges(corners[:, 0], corners[:, 2], pw, width, ct)     # [K, pw]
        # every bin, flattened: its RoI's image, rows [r0, r0 + bh), columns [c0, c0 + bw)
        shape = (k, ph, pw)
        bins = [t.expand(shape).reshape(-1) for t in (
            batch[:, None, None], hs[:, :, None], (he - hs)[:, :, None],
            ws[:, None, :], (we - ws)[:, None, :])]
        flat = torch.arange(k * ph * pw, device=x.device)
        nonempty = (bins[2] > 0) & (bins[4] > 0)
        out.index_fill_(0, flat[~nonempty], 0)                     # an empty bin is 0
        flat = flat[nonempty]
        bb, r0, bh, c0, bw = (t[nonempty] for t in bins)
        # the kernels' running maximum starts at -FLT_MAX and skips NaN: the same as the
        # maximum over the map with NaN and everything below -FLT_MAX raised to -FLT_MAX
        # (-inf in float16/bfloat16, where -FLT_MAX overflows)
        lo = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32).to(x.dtype)
        for b in torch.unique(bb).tolist():
            if not 0 <= b < bsz:
                raise IndexError(f"roi_pool: batch index {b} out of range for {bsz} images")
            in_b = (bb == b).nonzero().squeeze(1)
            img = x[b].permute(1, 2, 0)                                   # [H, W, C]
            img = torch.where(torch.isnan(img), lo, img).clamp_min(lo).contiguous()
            b_bw = bw[in_b]
            cols = _window_levels(img, 1, int(b_bw.max()).bit_length() - 1)
            for w in torch.unique(b_bw).tolist():
                sel = in_b[b_bw == w]
                lw = w.bit_length() - 1
                wide = cols[lw]
                if w != 1 << lw:
                    # exact width w: windows [c, c + 2**lw) and [c + w - 2**lw, c + w)
                    wide = torch.maximum(wide.narrow(1, 0, width - w + 1),
                                         wide.narrow(1, w - (1 << lw), width - w + 1))
                s_bh = bh[sel]
                rows = _window_levels(wide, 0, int(s_bh.max()).bit_length() - 1)
                for h in torch.unique(s_bh).tolist():
                    pick = sel[s_bh == h]
                    lh = h.bit_length() - 1
                    top, left = r0[pick], c0[pick]
                    tall = rows[lh]
                    n_pos = (height - h + 1) * (width - w + 1)
                    if h == 1 << lh or n_pos <= 2 * pick.numel():
                        # one pass for the exact height h over the map, one read per bin
                        if h != 1 << lh:
                            tall = torch.maximum(tall.narrow(0, 0, height - h + 1),
                                                 tall.narrow(0, h - (1 << lh), height - h + 1))
                        val = tall.reshape(-1, chans).index_select(0, top * (width - w + 1)
                                                                   + left)
                    else:
                        # few bins of this size: two reads per bin, rows [r0, r0 + 2**lh)
                        # and [r0 + h - 2**lh, r0 + h)
                        m = tall.reshape(-1, chans)
                        val = torch.maximum(
                            m.index_select(0, top * (width - w + 1) + left),
                            m.index_select(0, (top + h - (1 << lh)) * (width - w + 1) + left))
                    out.index_copy_(0, flat[pick], val)
        return out.view(k, ph, pw, chans).permute(0, 3, 1, 2).contiguous()
