"""Detection ops (nms, batched_nms, roi_pool, box_iou): the references against independent
naive transcriptions of torchvision's kernels (plain Python/NumPy loops written here), the
op layer's contract and backends, and parity with torchvision where it imports."""
import builtins
import importlib
import math
import sys
import time
import types
from fractions import Fraction

import numpy as np
import pytest
import torch

from uniter_fast import ops, reference
from uniter_fast.ops import _registry

# the modules (the package's attributes of these names are the op functions)
nms_module = importlib.import_module("uniter_fast.ops.nms")
roi_pool_module = importlib.import_module("uniter_fast.ops.roi_pool")

FLT_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------- naive transcriptions

def naive_nms(boxes, scores, thr, cats=None):
    """Greedy NMS as torchvision's CPU kernel does it, scalar by scalar: float32 (float64 for
    float64 boxes) arithmetic with NumPy scalars, the IoU compared with ``thr`` as a double,
    a stable sort by decreasing score."""
    T = np.float64 if boxes.dtype == torch.float64 else np.float32
    b = [[T(v) for v in row] for row in boxes.double().tolist()]
    s = scores.double().tolist()
    cats = None if cats is None else cats.tolist()
    n = len(b)
    order = sorted(range(n), key=lambda i: -s[i])          # Python's sort is stable
    area = [(r[2] - r[0]) * (r[3] - r[1]) for r in b]
    suppressed = [False] * n
    keep = []
    with np.errstate(all="ignore"):
        for a, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[a + 1:]:
                if suppressed[j] or (cats is not None and cats[i] != cats[j]):
                    continue
                w = max(T(0), min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
                h = max(T(0), min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
                inter = w * h
                if float(inter / (area[i] + area[j] - inter)) > thr:
                    suppressed[j] = True
    return keep


def greedy_property_holds(boxes, scores, thr, kept):
    """For N too large for :func:`naive_nms`: ``kept`` (decreasing score) is the greedy
    result iff, in the stable decreasing-score order, a box is kept exactly when no earlier
    kept box overlaps it with IoU > thr (IoU by NumPy float32, compared as a double)."""
    b = boxes.numpy().astype(np.float32)
    s = scores.double().numpy()
    order = np.argsort(-s, kind="stable")
    b = b[order]
    n = len(b)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    is_kept = np.zeros(n, dtype=bool)
    is_kept[pos[kept.numpy()]] = True
    if not np.all(np.diff(pos[kept.numpy()]) > 0):
        return False                                       # not in decreasing-score order
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    covered = np.zeros(n, dtype=bool)
    with np.errstate(all="ignore"):
        for r0 in range(0, n, 500):
            r = slice(r0, min(n, r0 + 500))
            w = np.maximum(np.float32(0), np.minimum(b[r, None, 2], b[None, :, 2])
                           - np.maximum(b[r, None, 0], b[None, :, 0]))
            h = np.maximum(np.float32(0), np.minimum(b[r, None, 3], b[None, :, 3])
                           - np.maximum(b[r, None, 1], b[None, :, 1]))
            inter = w * h
            iou = inter / (area[r, None] + area[None, :] - inter)
            over = iou.astype(np.float64) > thr
            over &= np.arange(r0, r.stop)[:, None] < np.arange(n)[None, :]   # earlier rows
            covered |= (over & is_kept[r, None]).any(0)
    return bool(np.array_equal(is_kept, ~covered))


def c_round(v) -> int:
    """C's round() of a float, exactly (halves away from zero), via fractions."""
    f = Fraction(float(v))
    n = math.floor(abs(f) + Fraction(1, 2))
    return n if f >= 0 else -n


def naive_roi_pool(x, rois, output_size, scale, T=None):
    """torchvision's CPU roi_pool forward transcribed loop by loop: coordinates, bins and
    the running maximum (start -FLT_MAX, ``>``) in the kernel's float type T (float32;
    float64 for float64 inputs), for every RoI, bin and channel."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    T = T or (np.float64 if x.dtype == torch.float64 else np.float32)
    xv = x.double().numpy()                     # every fp16/bf16/fp32 value exactly
    rv = rois.to(torch.float64 if T is np.float64 else torch.float32).double().tolist()
    _, C, H, W = x.shape
    out = np.zeros((len(rv), C, ph, pw))
    for k, row in enumerate(rv):
        b = int(T(row[0]))
        sw, sh, ew, eh = (c_round(T(v) * T(scale)) for v in row[1:])
        rw, rh = max(ew - sw + 1, 1), max(eh - sh + 1, 1)
        bin_h, bin_w = T(rh) / T(ph), T(rw) / T(pw)
        for i in range(ph):
            hs = min(max(math.floor(T(i) * bin_h) + sh, 0), H)
            he = min(max(math.ceil(T(i + 1) * bin_h) + sh, 0), H)
            for j in range(pw):
                ws = min(max(math.floor(T(j) * bin_w) + sw, 0), W)
                we = min(max(math.ceil(T(j + 1) * bin_w) + sw, 0), W)
                if he <= hs or we <= ws:
                    continue                                    # empty bin: 0
                m = np.full(C, -FLT_MAX)
                for h in range(hs, he):
                    for w in range(ws, we):
                        v = xv[b, :, h, w]
                        m = np.where(v > m, v, m)               # NaN never wins
                out[k, :, i, j] = m
    return torch.from_numpy(out).to(x.dtype)                    # -FLT_MAX: -inf in fp16/bf16


# ----------------------------------------------------------------- data

def random_boxes(n, gen, size=100.0, max_wh=40.0, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * max_wh
    return torch.cat([xy, xy + wh], 1).to(dtype)


def awkward_boxes(n, gen):
    """Random boxes plus duplicates, nested, zero-width, inverted and point boxes."""
    b = random_boxes(n, gen)
    if n >= 6:
        b[1] = b[0]                                          # identical: IoU exactly 1
        b[2] = torch.tensor([b[0, 0] + 1, b[0, 1] + 1, b[0, 2] - 1, b[0, 3] - 1])  # nested
        b[3, 2] = b[3, 0]                                    # zero width
        b[4, [0, 2]] = b[4, [2, 0]]                          # inverted x
        b[5, 2:] = b[5, :2]                                  # a point
    return b


def make_rois(k, gen, img=(208.0, 272.0), batch=1, dtype=torch.float32):
    """RoIs over an image of ``img`` (h, w) pixels: partly outside, inverted, with corners
    at .5 after scaling by 1/16 (multiples of 8) and fractional ones."""
    hmax, wmax = img
    x1 = torch.rand(k, generator=gen) * (wmax + 64) - 32
    y1 = torch.rand(k, generator=gen) * (hmax + 64) - 32
    x2 = x1 + torch.rand(k, generator=gen) * wmax * 0.8 - 8        # some x2 < x1
    y2 = y1 + torch.rand(k, generator=gen) * hmax * 0.8 - 8
    r = torch.stack([torch.randint(0, batch, (k,), generator=gen).float(), x1, y1, x2, y2], 1)
    half = torch.rand(k, 4, generator=gen) < 0.4                    # exactly .5 after /16
    r[:, 1:] = torch.where(half, torch.round(r[:, 1:] / 16) * 16 + 8, r[:, 1:])
    return r.to(dtype)


# ----------------------------------------------------------------- box_iou

def test_box_iou_matches_float64_formula_and_is_zero_for_empty_boxes():
    g = torch.Generator().manual_seed(0)
    a, b = awkward_boxes(9, g), awkward_boxes(7, g)
    iou = reference.box_iou(a, b)
    assert iou.shape == (9, 7) and iou.dtype == torch.float32 and torch.isfinite(iou).all()
    an, bn = a.double().numpy(), b.double().numpy()
    for i in range(9):
        for j in range(7):
            w = max(0.0, min(an[i, 2], bn[j, 2]) - max(an[i, 0], bn[j, 0]))
            h = max(0.0, min(an[i, 3], bn[j, 3]) - max(an[i, 1], bn[j, 1]))
            area = [(r[2] - r[0]) * (r[3] - r[1]) for r in (an[i], bn[j])]
            union = area[0] + area[1] - w * h
            expect = w * h / union if union > 0 else 0.0
            assert abs(float(iou[i, j]) - expect) <= 1e-6, (i, j)
    pts = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    assert torch.equal(reference.box_iou(pts, pts), torch.zeros(2, 2))    # 0 / 0 -> 0
    assert reference.box_iou(a.double(), b.double()).dtype == torch.float64
    assert reference.box_iou(a.half(), b.half()).dtype == torch.float32
    assert reference.box_iou(a[:0], b).shape == (0, 7)


# ----------------------------------------------------------------- nms

@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 101, 400])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_naive_greedy(n, thr):
    g = torch.Generator().manual_seed(n * 10 + int(thr * 10))
    boxes = awkward_boxes(n, g)
    scores = torch.rand(n, generator=g)
    keep = reference.nms(boxes, scores, thr)
    assert keep.dtype == torch.int64 and keep.shape == (len(keep),)
    assert keep.tolist() == naive_nms(boxes, scores, thr)
    assert torch.equal(ops.nms(boxes, scores, thr), keep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_nms_dtypes(dtype):
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(150, g, dtype=dtype)
    scores = torch.rand(150, generator=g).to(dtype)
    keep = ops.nms(boxes, scores, 0.4)
    # float16/bfloat16 boxes are computed in float32: the naive kernel on their float32 values
    ref_boxes = boxes if dtype == torch.float64 else boxes.float()
    assert keep.tolist() == naive_nms(ref_boxes, scores, 0.4)


def test_nms_ties_keep_the_lower_index_first():
    g = torch.Generator().manual_seed(6)
    boxes = awkward_boxes(300, g)
    scores = torch.randint(0, 4, (300,), generator=g).float() / 4     # four score values
    for thr in (0.2, 0.5):
        keep = reference.nms(boxes, scores, thr)
        assert keep.tolist() == naive_nms(boxes, scores, thr)
    same = torch.tensor([[0.0, 0, 10, 10]] * 5)
    assert reference.nms(same, torch.ones(5), 0.5).tolist() == [0]
    assert reference.nms(same, torch.ones(5), 1.0).tolist() == [0, 1, 2, 3, 4]   # IoU 1 > 1: no


def test_nms_threshold_is_strict_and_compared_as_a_double():
    boxes = torch.tensor([[0.0, 0, 2, 1], [0.0, 0, 1, 1]])             # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert reference.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert reference.nms(boxes, scores, 0.4999).tolist() == [0]
    # IoU 0.7 in float32 is 0.699999988 < 0.7 as a double: kept (a float32 compare of
    # the threshold would agree here); one float32 step above 0.7 (0.70000005) suppresses
    b = torch.tensor([[0.0, 0, 10, 1], [0.0, 0, 7, 1]])
    iou = float(reference.box_iou(b[:1], b[1:]))
    assert iou == float(np.float32(0.7)) and iou < 0.7
    assert reference.nms(b, scores, 0.7).tolist() == [0, 1]
    assert reference.nms(b, scores, iou).tolist() == [0, 1]
    assert reference.nms(b, scores, np.nextafter(iou, 0.0)).tolist() == [0]
    # a threshold between two float32 values: compared as a double, not rounded to float32
    big = torch.tensor([[0.0, 0, 3, 1], [0.0, 0, 1, 1]])                # IoU 1/3 in float32
    third = float(reference.box_iou(big[:1], big[1:]))
    below = float(np.nextafter(np.float32(third), np.float32(0)))
    just_below = below + (third - below) * 0.75
    assert float(np.float32(just_below)) == third                       # rounds up to it
    assert reference.nms(big, scores, just_below).tolist() == [0]       # third > just_below


def test_the_greedy_property_check_rejects_wrong_answers():
    g = torch.Generator().manual_seed(17)
    boxes = random_boxes(300, g)
    scores = torch.rand(300, generator=g)
    keep = torch.tensor(naive_nms(boxes, scores, 0.5))
    assert greedy_property_holds(boxes, scores, 0.5, keep)
    assert not greedy_property_holds(boxes, scores, 0.5, keep[:-1])         # one missing
    assert not greedy_property_holds(boxes, scores, 0.5, keep.flip(0))      # wrong order
    extra = torch.tensor(sorted(set(range(300)) - set(keep.tolist()))[:1])
    both = torch.cat([keep, extra])
    both = both[torch.sort(scores[both], descending=True, stable=True)[1]]
    assert not greedy_property_holds(boxes, scores, 0.5, both)              # one too many


def test_nms_6000_boxes_is_greedy_and_fast():
    g = torch.Generator().manual_seed(7)
    boxes = random_boxes(6000, g, size=1000.0, max_wh=200.0)
    scores = torch.rand(6000, generator=g)
    reference.nms(boxes[:100], scores[:100], 0.7)                       # warm-up
    t = time.perf_counter()
    keep = reference.nms(boxes, scores, 0.7)
    elapsed = time.perf_counter() - t
    assert greedy_property_holds(boxes, scores, 0.7, keep)
    assert 0 < len(keep) < 6000
    assert elapsed < 2.0, f"nms of 6000 boxes took {elapsed:.2f} s"
    # ties over 6000 boxes too
    tied = torch.randint(0, 10, (6000,), generator=g).float()
    assert greedy_property_holds(boxes, tied, 0.5, reference.nms(boxes, tied, 0.5))


def test_nms_empty_and_grad_inputs():
    keep = reference.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    assert ops.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                           0.5).shape == (0,)
    g = torch.Generator().manual_seed(8)
    boxes = random_boxes(20, g).requires_grad_()
    scores = torch.rand(20, generator=g).requires_grad_()
    assert ops.nms(boxes, scores, 0.5).tolist() == naive_nms(boxes.detach(), scores.detach(),
                                                              0.5)


@pytest.mark.parametrize("n", [0, 1, 2, 31, 250])
def test_batched_nms_matches_naive_per_category(n):
    g = torch.Generator().manual_seed(100 + n)
    boxes = awkward_boxes(n, g)
    scores = torch.randint(0, 6, (n,), generator=g).float()          # ties across categories
    idxs = torch.randint(0, 4, (n,), generator=g)
    for thr in (0.0, 0.5, 0.9):
        keep = reference.batched_nms(boxes, scores, idxs, thr)
        assert keep.tolist() == naive_nms(boxes, scores, thr, cats=idxs)
        assert torch.equal(ops.batched_nms(boxes, scores, idxs.int(), thr), keep)
    # categories never suppress each other: the same box in two categories stays twice
    same = torch.tensor([[0.0, 0, 4, 4]] * 2)
    assert reference.batched_nms(same, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]),
                                 0.1).tolist() == [1, 0]


def test_batched_nms_6000_boxes():
    g = torch.Generator().manual_seed(9)
    boxes = random_boxes(6000, g, size=600.0, max_wh=150.0)
    scores = torch.rand(6000, generator=g)
    idxs = torch.randint(0, 30, (6000,), generator=g)
    t = time.perf_counter()
    keep = reference.batched_nms(boxes, scores, idxs, 0.5)
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0, f"batched_nms of 6000 boxes took {elapsed:.2f} s"
    kept = torch.zeros(6000, dtype=torch.bool)
    kept[keep] = True
    for c in range(30):                    # each category on its own is greedy NMS
        m = (idxs == c).nonzero().squeeze(1)
        local = kept[m].nonzero().squeeze(1)
        local = local[torch.sort(scores[m][local], descending=True, stable=True)[1]]
        assert greedy_property_holds(boxes[m], scores[m], 0.5, local), c
    order = scores[keep]
    assert torch.all(order[:-1] >= order[1:])


# ----------------------------------------------------------------- roi_pool

def _feature(shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("output_size", [1, 7, 14, (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_roi_pool_matches_naive_kernel(output_size, dtype):
    g = torch.Generator().manual_seed(11)
    x = _feature((2, 3, 13, 17), g, dtype)                         # 208 x 272 pixels at 1/16
    rois = make_rois(23, g, batch=2)
    out = reference.roi_pool(x, rois, output_size, 1 / 16)
    expect = naive_roi_pool(x, rois, output_size, 1 / 16)
    assert out.dtype == dtype and out.shape == expect.shape
    assert torch.equal(out, expect)                                # a maximum: bit-identical
    assert torch.equal(ops.roi_pool(x, rois, output_size, 1 / 16), expect)
    # rois in the input's dtype (as torchvision takes them)
    r = rois.to(dtype)
    assert torch.equal(reference.roi_pool(x, r, output_size, 1 / 16),
                       naive_roi_pool(x, r, output_size, 1 / 16))


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3, 1 / 16])
def test_roi_pool_scales_and_batch_index(scale):
    g = torch.Generator().manual_seed(12)
    x = _feature((3, 4, 9, 11), g)
    rois = make_rois(15, g, img=(9 / scale, 11 / scale), batch=3)
    rois[:4, 0] = 2                                                # batch index > 0
    out = ops.roi_pool(x, rois, (2, 3), scale)
    assert torch.equal(out, naive_roi_pool(x, rois, (2, 3), scale))


def test_roi_pool_computes_coordinates_and_bins_in_float32():
    """Where float32 and float64 arithmetic disagree, the kernel's float32 wins: 7·(29/7)
    is 29 in float32 (29.000000000000004 in float64, whose ceil is 30), and 45 · 0.7 is
    31.5 in float32 (31.499999999999996 in float64)."""
    g = torch.Generator().manual_seed(16)
    x = _feature((1, 3, 70, 130), g)
    rois = torch.tensor([[0.0, 0, 0, 28, 30],          # extents 29 x 31
                         [0.0, 5, 3, 61, 60],          # 57 x 58
                         [0.0, 2, 1, 63, 62],          # 62 x 62
                         [0.0, 10, 4, 124, 118]])      # 115 x 115
    expect = naive_roi_pool(x, rois, 7, 1.0)
    assert not torch.equal(expect, naive_roi_pool(x, rois, 7, 1.0, T=np.float64))
    assert torch.equal(reference.roi_pool(x, rois, 7, 1.0), expect)
    scaled = torch.tensor([[0.0, 45, 85, 165, 165], [0.0, 85, 45, 125, 165]])
    expect = naive_roi_pool(x, scaled, (2, 3), 0.7)
    assert not torch.equal(expect, naive_roi_pool(x, scaled, (2, 3), 0.7, T=np.float64))
    assert torch.equal(reference.roi_pool(x, scaled, (2, 3), 0.7), expect)
    # float64 inputs compute in float64, as torchvision's double kernel does
    xd = x.double()
    assert torch.equal(reference.roi_pool(xd, rois.double(), 7, 1.0),
                       naive_roi_pool(xd, rois.double(), 7, 1.0))


def test_roi_pool_rounds_halves_away_from_zero():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 2, 8).contiguous()  # value = column
    # x1 = x2 = 2.5 -> column 3 (C round; round-half-even would read column 2)
    out = reference.roi_pool(x, torch.tensor([[0.0, 2.5, 0, 2.5, 0]]), 1, 1.0)
    assert out.item() == 3.0
    # 40 / 16 = 2.5 and 72 / 16 = 4.5 -> columns 3..5
    out = reference.roi_pool(x, torch.tensor([[0.0, 40, 0, 72, 0]]), (1, 3), 1 / 16)
    assert out.flatten().tolist() == [3.0, 4.0, 5.0]
    # -0.5 -> -1: bins [-1, 0) (clipped: empty, 0) and [0, 1) (column 0 = 0.0) ...
    out = reference.roi_pool(x + 1, torch.tensor([[0.0, -0.5, 0, 0.4, 0]]), (1, 2), 1.0)
    assert out.flatten().tolist() == [0.0, 1.0]
    # ... and the float just below 0.5 rounds to 0 (floor(v + 0.5) in float32 would give 1)
    v = float(np.nextafter(np.float32(0.5), np.float32(0)))
    out = reference.roi_pool(x, torch.tensor([[0.0, v, 0, v, 0]]), 1, 1.0)
    assert out.item() == 0.0
    assert c_round(v) == 0 and c_round(2.5) == 3 and c_round(-2.5) == -3


def test_roi_pool_nan_inf_and_the_minus_flt_max_floor():
    g = torch.Generator().manual_seed(13)
    x = _feature((1, 5, 6, 7), g, torch.float64)
    x[0, 0, :3, :3] = float("nan")                    # NaN never wins
    x[0, 1] = float("-inf")                           # all -inf: the kernels give -FLT_MAX
    x[0, 2, 2, 2] = float("inf")
    x[0, 3, :, :4] = -1e300                           # below -FLT_MAX in float64
    x[0, 4] = float("nan")
    rois = torch.tensor([[0.0, 0, 0, 6, 5], [0.0, 0, 0, 1, 1], [0.0, 2, 2, 2, 2]])
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        out = reference.roi_pool(xd, rois, 2, 1.0)
        assert torch.equal(out, naive_roi_pool(xd, rois, 2, 1.0)), dtype
        assert not torch.isnan(out).any()
        floor = -FLT_MAX if dtype in (torch.float32, torch.float64) else float("-inf")
        assert out[:, 1].eq(floor).all() and out[:, 4].eq(floor).all()


def test_roi_pool_empty_rois_noncontiguous_and_grad():
    g = torch.Generator().manual_seed(14)
    x = _feature((2, 3, 8, 10), g)
    assert reference.roi_pool(x, torch.zeros(0, 5), 7, 0.5).shape == (0, 3, 7, 7)
    assert ops.roi_pool(x, torch.zeros(0, 5), (3, 5), 0.5).shape == (0, 3, 3, 5)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)          # same values, other strides
    rois = make_rois(9, g, img=(16.0, 20.0), batch=2)
    expect = naive_roi_pool(x, rois, 3, 0.5)
    assert torch.equal(reference.roi_pool(xt, rois, 3, 0.5), expect)
    xg = x.clone().requires_grad_()
    out = ops.roi_pool(xg, rois, 3, 0.5, backend="reference")
    assert torch.equal(out, expect) and not out.requires_grad     # inference only
    with torch.no_grad():
        assert torch.equal(ops.roi_pool(xg, rois.requires_grad_(), 3, 0.5), expect)


def test_roi_pool_detector_size_is_fast():
    g = torch.Generator().manual_seed(15)
    x = _feature((1, 1024, 38, 63), g)                           # a 600 x 1000 image at 1/16
    k = 300
    xy = torch.rand(k, 2, generator=g) * torch.tensor([1000.0, 600.0])
    wh = torch.rand(k, 2, generator=g) * torch.tensor([500.0, 400.0]) + 8
    rois = torch.cat([torch.zeros(k, 1), xy, xy + wh], 1)
    reference.roi_pool(x, rois[:10], 7, 1 / 16)                   # warm-up
    t = time.perf_counter()
    out = reference.roi_pool(x, rois, 7, 1 / 16)
    elapsed = time.perf_counter() - t
    assert out.shape == (300, 1024, 7, 7)
    assert elapsed < 3.0, f"roi_pool of 300 RoIs took {elapsed:.2f} s"
    some = torch.tensor([0, 1, 57, 123, 299])
    assert torch.equal(out[some], naive_roi_pool(x, rois[some], 7, 1 / 16))


# ----------------------------------------------------------------- the op layer

def _boxes():
    return torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 2, 2]]), torch.tensor([0.5, 0.4])


@pytest.mark.parametrize("args, error, words", [
    ((torch.zeros(3, 5), torch.zeros(3), 0.5), ValueError, ["boxes", "[N, 4]", "(3, 5)"]),
    ((torch.zeros(4), torch.zeros(4), 0.5), ValueError, ["boxes", "[N, 4]", "(4,)"]),
    (([[0, 0, 1, 1]], torch.zeros(1), 0.5), ValueError, ["boxes", "list"]),
    ((torch.zeros(3, 4), torch.zeros(2), 0.5), ValueError, ["scores", "N = 3", "(2,)"]),
    ((torch.zeros(3, 4), torch.zeros(3, 1), 0.5), ValueError, ["scores", "(3, 1)"]),
    ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3), 0.5), TypeError,
     ["boxes", "floating", "int64"]),
    ((torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32), 0.5), TypeError,
     ["scores", "floating", "int32"]),
    ((torch.zeros(3, 4), torch.zeros(3), 1.5), ValueError, ["iou_threshold", "[0, 1]", "1.5"]),
    ((torch.zeros(3, 4), torch.zeros(3), -0.1), ValueError, ["iou_threshold", "-0.1"]),
    ((torch.zeros(3, 4), torch.zeros(3), float("nan")), ValueError, ["iou_threshold"]),
    ((torch.zeros(3, 4), torch.zeros(3), "0.5"), ValueError, ["iou_threshold", "'0.5'"]),
    ((torch.zeros(3, 4), torch.zeros(3), True), ValueError, ["iou_threshold", "True"]),
    ((torch.tensor([[0.0, 0, 1, 1], [0, 0, float("inf"), 1]]), torch.zeros(2), 0.5),
     ValueError, ["boxes", "finite", "index 1"]),
    ((torch.zeros(2, 4), torch.tensor([0.0, float("nan")]), 0.5), ValueError,
     ["scores", "NaN"]),
    ((torch.zeros(2, 4), torch.zeros(2, device="meta"), 0.5), ValueError,
     ["scores", "meta", "cpu", "same device"]),
])
def test_nms_validates_its_inputs(args, error, words):
    for call in (lambda: ops.nms(*args),
                 lambda: ops.batched_nms(args[0], args[1], torch.zeros(2, dtype=torch.long),
                                         args[2])):
        with pytest.raises(error) as e:
            call()
        msg = str(e.value)
        assert all(w in msg for w in words), msg


@pytest.mark.parametrize("idxs, error, words", [
    (torch.zeros(3, dtype=torch.long), ValueError, ["idxs", "N = 2", "(3,)"]),
    (torch.zeros(2), TypeError, ["idxs", "integer", "float32"]),
    (torch.zeros(2, dtype=torch.bool), TypeError, ["idxs", "integer", "bool"]),
    (None, ValueError, ["idxs", "NoneType"]),
    (torch.zeros(2, dtype=torch.long, device="meta"), ValueError, ["idxs", "meta", "cpu"]),
])
def test_batched_nms_validates_idxs(idxs, error, words):
    boxes, scores = _boxes()
    with pytest.raises(error) as e:
        ops.batched_nms(boxes, scores, idxs, 0.5)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("change, error, words", [
    ({"input": torch.zeros(3, 8, 8)}, ValueError, ["input", "[B, C, H, W]", "(3, 8, 8)"]),
    ({"input": torch.zeros(1, 3, 8, 8, dtype=torch.long)}, TypeError,
     ["input", "floating", "int64"]),
    ({"rois": torch.zeros(2, 4)}, ValueError, ["rois", "[K, 5]", "(2, 4)"]),
    ({"rois": torch.zeros(2, 5, dtype=torch.int32)}, TypeError, ["rois", "floating", "int32"]),
    ({"rois": torch.zeros(2, 5, device="meta")}, ValueError, ["rois", "meta", "cpu"]),
    ({"output_size": 0}, ValueError, ["output_size", "positive", "0"]),
    ({"output_size": (3,)}, ValueError, ["output_size", "(3,)"]),
    ({"output_size": (2, 0)}, ValueError, ["output_size", "(2, 0)"]),
    ({"output_size": 2.5}, ValueError, ["output_size", "2.5"]),
    ({"output_size": True}, ValueError, ["output_size", "True"]),
    ({"spatial_scale": 0.0}, ValueError, ["spatial_scale", "> 0", "0.0"]),
    ({"spatial_scale": -1}, ValueError, ["spatial_scale", "-1"]),
    ({"spatial_scale": float("inf")}, ValueError, ["spatial_scale", "inf"]),
    ({"rois": torch.tensor([[0.0, 0, 0, float("nan"), 1]])}, ValueError,
     ["rois", "finite", "index 0"]),
    ({"rois": torch.tensor([[0.0, 0, 0, 1, 1], [2.0, 0, 0, 1, 1]])}, ValueError,
     ["rois[:, 0]", "[0, 2)", "2.0", "row 1"]),
    ({"rois": torch.tensor([[-1.0, 0, 0, 1, 1]])}, ValueError, ["rois[:, 0]", "-1.0"]),
    ({"rois": torch.tensor([[0.5, 0, 0, 1, 1]])}, ValueError, ["rois[:, 0]", "0.5"]),
])
def test_roi_pool_validates_its_inputs(change, error, words):
    args = {"input": torch.zeros(2, 3, 8, 8), "rois": torch.tensor([[1.0, 0, 0, 4, 4]]),
            "output_size": 2, "spatial_scale": 1.0}
    args.update(change)
    with pytest.raises(error) as e:
        ops.roi_pool(**args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_registry_lists_the_detection_backends():
    for op in ("nms", "batched_nms", "roi_pool"):
        assert ops.registered_backends(op) == ["torchvision", "reference"]
        assert "reference" in ops.available_backends(op, "cpu")
        assert ops.available_backends(op, "cpu", torch.float16)[-1] == "reference"
        # torchvision's kernels take float32/float64 only
        assert "float32/float64" in ops.unavailable_reason(op, "torchvision", "cpu",
                                                           torch.float16)
    assert "reference" in ops.available_backends("nms", "cpu")
    with ops.use_backend("reference"):
        boxes, scores = _boxes()
        assert ops.selected_backend("nms", device="cpu", boxes=boxes, scores=scores) == \
            "reference"


def test_torchvision_backend_unavailable_raises_with_a_reason():
    reason = ops.unavailable_reason("nms", "torchvision", "cpu")
    if reason is None:
        pytest.skip("torchvision's nms runs here: nothing to refuse")
    assert "torchvision" in reason
    assert "torchvision" not in ops.available_backends("nms", "cpu")
    boxes, scores = _boxes()
    with pytest.raises(ops.BackendUnavailableError) as e:
        ops.nms(boxes, scores, 0.5, backend="torchvision")
    assert "torchvision" in str(e.value) and reason in str(e.value)
    with pytest.raises(ops.BackendUnavailableError, match="torchvision"):
        ops.roi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 1, 1]]), 2,
                     backend="torchvision")
    # "auto" falls back to the reference
    assert ops.selected_backend("roi_pool", device="cpu") == "reference"


def test_a_torchvision_import_that_raises_is_a_reason_not_a_crash(monkeypatch):
    """With a CPU-only torch, torchvision's CUDA wheel raises RuntimeError on import."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    nms_module._torchvision_import_error.cache_clear()
    _registry.clear_cache()
    try:
        reason = ops.unavailable_reason("roi_pool", "torchvision", "cpu")
        assert "RuntimeError" in reason and "torchvision::nms does not exist" in reason
        assert ops.available_backends("nms", "cpu") == ["reference"]
        boxes, scores = _boxes()
        assert ops.nms(boxes, scores, 0.5).tolist() == [0, 1]
        with pytest.raises(ops.BackendUnavailableError, match="does not exist"):
            ops.batched_nms(boxes, scores, torch.zeros(2, dtype=torch.long), 0.5,
                            backend="torchvision")
    finally:
        monkeypatch.undo()
        nms_module._torchvision_import_error.cache_clear()
        _registry.clear_cache()


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Where torchvision does not import: an importable stand-in module and CPU kernels
    ``torchvision::nms`` / ``torchvision::roi_pool`` with torchvision's schemas, computed by
    the references, so that the torchvision backends' glue (argument order, the per-category
    loop and ordering of batched_nms, availability per device) runs here."""
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision imports here: the parity tests check the real one")
    except Exception:
        pass
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("roi_pool(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
               "int pooled_width) -> (Tensor, Tensor)")
    calls = []

    def nms_kernel(dets, scores, iou_threshold):
        calls.append("nms")
        return reference.nms(dets, scores, iou_threshold)

    def roi_pool_kernel(input, rois, spatial_scale, pooled_height, pooled_width):
        calls.append("roi_pool")
        out = reference.roi_pool(input, rois, (pooled_height, pooled_width), spatial_scale)
        return out, torch.zeros(out.shape, dtype=torch.int32)

    lib.impl("nms", nms_kernel, "CPU")
    lib.impl("roi_pool", roi_pool_kernel, "CPU")
    nms_module._torchvision_import_error.cache_clear()
    _registry.clear_cache()
    try:
        yield calls
    finally:
        lib._destroy()
        for name in ("nms", "roi_pool"):
            torch.ops.torchvision.__dict__.pop(name, None)     # the namespace's cached packets
        monkeypatch.undo()
        nms_module._torchvision_import_error.cache_clear()
        _registry.clear_cache()


def test_torchvision_backends_glue(fake_torchvision):
    calls = fake_torchvision
    for op in ("nms", "batched_nms", "roi_pool"):
        assert ops.available_backends(op, "cpu") == ["torchvision", "reference"]
        assert "no CUDA kernel" in ops.unavailable_reason(op, "torchvision", "cuda")
    g = torch.Generator().manual_seed(31)
    boxes = awkward_boxes(200, g)
    scores = torch.randint(0, 8, (200,), generator=g).float()       # ties across categories
    idxs = torch.randint(0, 6, (200,), generator=g)
    assert ops.selected_backend("nms", device="cpu", boxes=boxes, scores=scores) == \
        "torchvision"
    assert torch.equal(ops.nms(boxes, scores, 0.5), reference.nms(boxes, scores, 0.5))
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5),
                       reference.batched_nms(boxes, scores, idxs, 0.5))
    assert calls.count("nms") == 1 + len(torch.unique(idxs))          # one per category
    assert ops.batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5).shape == (0,)
    # mixed dtypes are declined per call: the reference runs them
    assert ops.selected_backend("nms", device="cpu", boxes=boxes,
                                scores=scores.double()) == "reference"
    n_calls = len(calls)
    assert torch.equal(ops.nms(boxes, scores.double(), 0.5),
                       reference.nms(boxes, scores.double(), 0.5))
    assert len(calls) == n_calls
    x = torch.randn(2, 4, 13, 17, generator=g)
    rois = make_rois(30, g, batch=2)
    assert torch.equal(ops.roi_pool(x, rois, (3, 5), 1 / 16),
                       naive_roi_pool(x, rois, (3, 5), 1 / 16))
    assert calls[-1] == "roi_pool"
    assert torch.equal(ops.roi_pool(x, rois.double(), 2, 1 / 16),           # declined
                       reference.roi_pool(x, rois.double(), 2, 1 / 16))
    assert calls[-1] == "roi_pool" and calls.count("roi_pool") == 1


def test_torchvision_backends_decline_mixed_dtypes():
    call = _registry.Call("nms", torch.device("cpu"), torch.float32,
                          {"boxes": torch.zeros(1, 4),
                           "scores": torch.zeros(1, dtype=torch.float64)})
    assert "scores of the boxes' dtype" in nms_module._tv_accepts(call)
    assert nms_module._tv_accepts(_registry.Call("nms", torch.device("cpu"), torch.float32)) \
        is None
    call = _registry.Call("roi_pool", torch.device("cpu"), torch.float32,
                          {"input": torch.zeros(1, 1, 2, 2), "rois": torch.zeros(1, 5).double()})
    assert "rois of the input's dtype" in roi_pool_module._tv_accepts(call)


# ----------------------------------------------------------------- parity with torchvision

def _torchvision():
    try:
        import torchvision
    except Exception as e:        # not installed, or built for another torch (RuntimeError)
        pytest.skip(f"torchvision does not import here ({type(e).__name__}: {e}); "
                    "the parity tests need it")
    return torchvision


def _parity(device):
    tv = _torchvision()
    if ops.unavailable_reason("nms", "torchvision", device) is not None:
        pytest.skip(ops.unavailable_reason("nms", "torchvision", device))
    g = torch.Generator().manual_seed(21)
    for n in (0, 1, 2, 37, 500, 3000):
        for dtype in (torch.float32, torch.float64):
            boxes = awkward_boxes(n, g).to(dtype).to(device)
            scores = torch.rand(n, generator=g).to(dtype).to(device)   # distinct scores
            for thr in (0.0, 0.5, 0.75, 1.0):
                expect = reference.nms(boxes, scores, thr)
                assert torch.equal(tv.ops.nms(boxes, scores, thr), expect)
                assert torch.equal(ops.nms(boxes, scores, thr, backend="torchvision"), expect)
            idxs = torch.randint(0, 5, (n,), generator=g).to(device)
            expect = reference.batched_nms(boxes, scores, idxs, 0.5)
            assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5,
                                               backend="torchvision"), expect)
            ints = boxes.round()        # integer boxes: torchvision's offset trick is exact
            assert torch.equal(tv.ops.batched_nms(ints, scores, idxs, 0.5),
                               reference.batched_nms(ints, scores, idxs, 0.5))
    x = torch.randn(2, 16, 13, 17, generator=g)
    rois = make_rois(200, g, batch=2)
    for dtype in (torch.float32, torch.float64):
        xd, rd = x.to(dtype).to(device), rois.to(dtype).to(device)
        for size in (1, 7, 14, (3, 5)):
            for scale in (1 / 16, 0.3):
                expect = reference.roi_pool(xd, rd, size, scale)
                assert torch.equal(tv.ops.roi_pool(xd, rd, size, scale), expect)
                assert torch.equal(ops.roi_pool(xd, rd, size, scale, backend="torchvision"),
                                   expect)


def test_parity_with_torchvision_cpu():
    # distinct scores only: torchvision sorts without asking for a stable sort, so the
    # order of equal scores (and then which of two tied overlapping boxes stays) may differ
    _parity("cpu")


@pytest.mark.cuda
def test_parity_with_torchvision_cuda():
    _parity("cuda")


@pytest.mark.cuda
def test_reference_on_cuda_equals_reference_on_cpu():
    g = torch.Generator().manual_seed(23)
    boxes = awkward_boxes(700, g)
    scores = torch.rand(700, generator=g)
    idxs = torch.randint(0, 3, (700,), generator=g)
    keep = reference.nms(boxes.cuda(), scores.cuda(), 0.5)
    assert keep.is_cuda and torch.equal(keep.cpu(), reference.nms(boxes, scores, 0.5))
    assert torch.equal(reference.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
                       reference.batched_nms(boxes, scores, idxs, 0.5))
    x = torch.randn(2, 8, 13, 17, generator=g)
    rois = make_rois(50, g, batch=2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = ops.roi_pool(x.to(dtype).cuda(), rois.cuda(), 7, 1 / 16, backend="reference")
        assert torch.equal(out.cpu(), reference.roi_pool(x.to(dtype), rois, 7, 1 / 16))
