"""The bottom-up-attention detector: weights loading in both public layouts, each stage
against an independent plain implementation written here, batched against one at a time, and
the image preprocessing.  Tiny networks (tests/detector_layouts.py TINY) and small images keep
it fast; the real network's key list is checked on the meta device."""
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detector_layouts import (
    REAL,
    TINY,
    hf_cell_anchors,
    public_shapes,
    random_weights,
    write_bin,
    write_pkl,
)
from PIL import Image

from uniter_fast.data.db import compute_num_bb
from uniter_fast.detector import (
    DetectorConfig,
    Extractor,
    ImageError,
    WeightsError,
    load_detector,
    load_image,
)
from uniter_fast.detector.boxes import (
    apply_deltas,
    cell_anchors,
    class_nms_max_conf,
    grid_anchors,
    select_boxes,
)
from uniter_fast.detector.image import prepare, resized_size
from uniter_fast.detector.model import Bottleneck, BottomUpDetector, Stem
from uniter_fast.detector.weights import ANCHORS_KEY

SMALL = DetectorConfig(min_size=96, max_size=160)


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("detw")
    out = {"pkl": str(d / "vg.pkl"), "pkl_nostats": str(d / "vg_nostats.pkl"),
           "bin": str(d / "pytorch_model.bin")}
    write_pkl(out["pkl"], weights, with_stats=True)
    write_pkl(out["pkl_nostats"], weights, with_stats=False)
    write_bin(out["bin"], weights)
    return out


# ----------------------------------------------------------------------------- weights

def test_real_network_has_the_public_key_names_and_shapes():
    with torch.device("meta"):
        model = BottomUpDetector(DetectorConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if k != "proposal_generator.anchor_generator.cell_anchors"}
    assert ours == dict(public_shapes(REAL))
    assert len(ours) > 500          # ResNet-101: the whole list, not a few keys


@pytest.mark.parametrize("layout", ["pkl", "pkl_nostats", "bin"])
def test_both_layouts_load_strictly_with_the_file_values(files, weights, layout):
    model = load_detector(files[layout], SMALL)
    assert model.weights_layout == ("torch" if layout == "bin" else "detectron2-pkl")
    sd = model.state_dict()
    for k, v in weights.items():
        if layout == "pkl_nostats" and k.endswith("running_mean"):
            assert torch.equal(sd[k], torch.zeros_like(sd[k]))
        elif layout == "pkl_nostats" and k.endswith("running_var"):
            assert torch.equal(sd[k], torch.ones_like(sd[k]))
        else:
            assert torch.equal(sd[k], torch.from_numpy(v)), k
    assert model.cfg.blocks == TINY["blocks"] and model.cfg.num_classes == TINY["classes"]
    assert model.cfg.num_attrs == TINY["attrs"] and model.cfg.res5_blocks == TINY["res5_blocks"]
    anchors = model.proposal_generator.anchor_generator.cell_anchors
    torch.testing.assert_close(anchors, torch.from_numpy(hf_cell_anchors()))


def test_stored_anchors_are_used(tmp_path, weights):
    odd = hf_cell_anchors() * 0.5 + 3
    write_bin(str(tmp_path / "w.bin"), weights, anchors=odd)
    model = load_detector(str(tmp_path / "w.bin"), SMALL)
    assert torch.equal(model.proposal_generator.anchor_generator.cell_anchors,
                       torch.from_numpy(odd))


def test_a_weights_directory_and_a_missing_file(tmp_path, weights):
    write_bin(str(tmp_path / "pytorch_model.bin"), weights)
    assert load_detector(str(tmp_path), SMALL).weights_layout == "torch"
    with pytest.raises(WeightsError, match="no such file"):
        load_detector(str(tmp_path / "nope.pkl"))


@pytest.mark.parametrize("layout", ["pkl", "bin"])
def test_a_renamed_or_missing_key_is_named(tmp_path, weights, layout):
    key = "backbone.res3.1.conv2.weight"
    renamed = dict(weights)
    renamed["backbone.res3.1.conv2.wieght"] = renamed.pop(key)
    dropped = {k: v for k, v in weights.items() if k != "roi_heads.box_predictor.fc_attr.bias"}
    misshapen = dict(weights)
    misshapen["roi_heads.box_predictor.cls_score.bias"] = np.zeros(3, np.float32)
    write = (lambda p, w: write_pkl(p, w)) if layout == "pkl" else write_bin
    for name, w, pattern in [
            ("renamed", renamed, r"missing 1 key\(s\): backbone\.res3\.1\.conv2\.weight.*"
                                 r"unexpected 1 key\(s\): backbone\.res3\.1\.conv2\.wieght"),
            ("dropped", dropped, r"missing 1 key\(s\): roi_heads\.box_predictor\.fc_attr\.bias"),
            ("misshapen", misshapen, r"cls_score\.bias has shape \[3\]")]:
        p = str(tmp_path / f"{name}.{layout}")
        write(p, w)
        with pytest.raises(WeightsError, match=pattern):
            load_detector(p, SMALL)


def test_a_nan_weight_is_refused(tmp_path, weights):
    bad = dict(weights)
    bad["backbone.stem.conv1.weight"] = bad["backbone.stem.conv1.weight"].copy()
    bad["backbone.stem.conv1.weight"][0, 0, 0, 0] = np.nan
    write_pkl(str(tmp_path / "nan.pkl"), bad)
    with pytest.raises(WeightsError, match="backbone.stem.conv1.weight contains NaN"):
        load_detector(str(tmp_path / "nan.pkl"), SMALL)


class _Payload:
    """Unpickling this runs code (writes a file): the loaders must refuse it unbuilt."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_holding_code_is_refused_without_running_it(tmp_path, weights):
    marker = tmp_path / "ran"
    model = dict(weights)
    model["evil"] = _Payload(str(marker))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": model}, f)
    with pytest.raises(WeightsError, match=r"refused to load (builtins|io)\.open"):
        load_detector(str(tmp_path / "evil.pkl"))
    # a torch file with the same payload: weights_only refuses it too
    sd = {k: torch.from_numpy(v) for k, v in weights.items()}
    sd["evil"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "evil.bin")
    with pytest.raises(WeightsError, match="refused"):
        load_detector(str(tmp_path / "evil.bin"))
    assert not marker.exists()
    # an object array is refused as data too (numpy would unpickle its items)
    obj = dict(weights)
    obj["backbone.stem.conv1.norm.bias"] = np.array([1, "x"], dtype=object)
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump({"model": obj}, f)
    with pytest.raises(WeightsError, match="expected a numeric array"):
        load_detector(str(tmp_path / "obj.pkl"))


def test_protocol_2_and_latest_protocol_pickles_load(tmp_path, weights):
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        with open(tmp_path / f"p{proto}.pkl", "wb") as f:
            pickle.dump({"model": dict(weights), "__author__": "x"}, f, protocol=proto)
        assert load_detector(str(tmp_path / f"p{proto}.pkl"), SMALL).cfg.num_classes == 7


# ----------------------------------------------------------------------------- stages

def _norm(x, p):
    """Frozen batch norm written out."""
    scale = p["weight"] / torch.sqrt(p["running_var"] + 1e-5)
    return (x - p["running_mean"][:, None, None]) * scale[:, None, None] + p["bias"][:, None, None]


def _params(sd, prefix):
    return {k[len(prefix) + 1:]: v.double() for k, v in sd.items() if k.startswith(prefix + ".")}


def _maxpool_caffe(x):
    """3x3 / 2 max pool with no padding, windows clipped at the far edge (caffe's ceil mode;
    a map under 3 wide still gives one output)."""
    h, w = x.shape[-2:]
    oh, ow = max(math.ceil((h - 3) / 2) + 1, 1), max(math.ceil((w - 3) / 2) + 1, 1)
    out = torch.empty(*x.shape[:-2], oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[..., i, j] = x[..., 2 * i:min(2 * i + 3, h), 2 * j:min(2 * j + 3, w)].amax((-2, -1))
    return out


@pytest.mark.parametrize("hw", [(17, 23), (1, 1), (8, 5), (30, 31)])
def test_stem_against_a_plain_implementation(files, hw):
    model = load_detector(files["pkl"], SMALL)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    p = _params(model.state_dict(), "backbone.stem.conv1")
    want = _maxpool_caffe(torch.relu(_norm(F.conv2d(x.double(), p["weight"], stride=2,
                                                    padding=3), _norm_params(p))))
    stem = model.backbone.stem
    torch.testing.assert_close(stem(x).double(), want, rtol=1e-4, atol=1e-4)
    model.fold_norms()
    torch.testing.assert_close(stem(x).double(), want, rtol=1e-4, atol=1e-4)
    assert isinstance(stem, Stem)


def _norm_params(p, prefix="norm"):
    return {k.split(".")[-1]: v for k, v in p.items() if k.startswith(prefix + ".")}


@pytest.mark.parametrize("where", ["backbone.res3.0", "backbone.res2.0", "roi_heads.res5.1",
                                   "roi_heads.res5.0"])
def test_a_bottleneck_against_a_plain_implementation(files, where):
    model = load_detector(files["bin"], SMALL)
    sd = model.state_dict()
    block = model.get_submodule(where)
    assert isinstance(block, Bottleneck)
    cin = block.conv1.in_channels
    x = torch.randn(3, cin, 13, 9, generator=torch.Generator().manual_seed(3)).abs()
    p = _params(sd, where)
    stride = 2 if where == "backbone.res3.0" else 1
    dil = 2 if where.startswith("roi_heads") else 1      # the VG model's res5: dilation 2

    def conv(name, t, **kw):
        return _norm(F.conv2d(t, p[f"{name}.weight"], **kw), _norm_params(p, f"{name}.norm"))

    xd = x.double()
    y = torch.relu(conv("conv1", xd, stride=stride))
    y = torch.relu(conv("conv2", y, padding=dil, dilation=dil))
    y = conv("conv3", y)
    short = conv("shortcut", xd, stride=stride) if "shortcut.weight" in p else xd
    want = torch.relu(y + short)
    torch.testing.assert_close(block(x).double(), want, rtol=1e-4, atol=1e-4)


def test_cell_and_grid_anchors_against_the_formula():
    cells = cell_anchors((64, 128, 256, 512), (0.5, 1.0, 2.0))
    torch.testing.assert_close(cells, torch.from_numpy(hf_cell_anchors()))
    grid = grid_anchors(cells, 3, 5, 16)
    assert grid.shape == (3 * 5 * 12, 4)
    for y in range(3):
        for x in range(5):
            for a in range(12):
                row = grid[(y * 5 + x) * 12 + a]
                torch.testing.assert_close(row, cells[a] + torch.tensor([16. * x, 16. * y] * 2))


def test_box_decoding_against_the_formula():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(9, 4, generator=g) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    deltas = torch.randn(9, 12, generator=g) * 3
    deltas[0, 2] = 40.0                  # clamped scale
    w = (10.0, 10.0, 5.0, 5.0)
    clamp = math.log(1000 / 16)
    got = apply_deltas(deltas, boxes, w, clamp)
    for i in range(9):
        x1, y1, x2, y2 = boxes[i].tolist()
        bw, bh = x2 - x1, y2 - y1
        for c in range(3):
            dx, dy, dw, dh = (deltas[i, 4 * c:4 * c + 4] / torch.tensor(w)).tolist()
            dw, dh = min(dw, clamp), min(dh, clamp)
            cx, cy = x1 + bw / 2 + dx * bw, y1 + bh / 2 + dy * bh
            pw, ph = math.exp(dw) * bw, math.exp(dh) * bh
            want = torch.tensor([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])
            torch.testing.assert_close(got[i, 4 * c:4 * c + 4], want, rtol=1e-5, atol=1e-3)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _generate_tsv_max_conf(boxes, scores, thresh):
    """The original extraction's loop: NMS per class, max of the kept scores per box."""
    boxes, scores = boxes.tolist(), scores.tolist()
    r, k = len(boxes), len(scores[0]) if scores else 0
    max_conf = [0.0] * r
    for c in range(k):
        order = sorted(range(r), key=lambda i: (-scores[i][c], i))
        kept = []
        for i in order:
            if all(_iou(boxes[i], boxes[j]) <= thresh for j in kept):
                kept.append(i)
        for i in kept:
            max_conf[i] = max(max_conf[i], scores[i][c])
    return max_conf


@pytest.mark.parametrize("r,k", [(0, 5), (1, 1), (7, 3), (40, 11), (33, 1)])
def test_class_nms_max_conf_against_the_original_loop(r, k):
    g = torch.Generator().manual_seed(r * 31 + k)
    xy = torch.rand(r, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 5 + torch.rand(r, 2, generator=g) * 30], 1)
    scores = torch.softmax(torch.randn(r, k + 1, generator=g) * 3, -1)[:, :k]
    if r > 3:
        boxes[3] = boxes[2]              # a duplicate box: suppressed in most classes
    conf, cls = class_nms_max_conf(boxes, scores, 0.3)
    want = _generate_tsv_max_conf(boxes, scores, 0.3)
    torch.testing.assert_close(conf, torch.tensor(want, dtype=torch.float32))
    for i in range(r):
        if want[i] > 0:
            assert scores[i, cls[i]] == conf[i]


@pytest.mark.parametrize("n,th,lo,hi", [(0, 0.2, 10, 100), (5, 0.2, 10, 100), (150, 0.2, 10, 100),
                                        (150, 0.9, 10, 100), (150, 0.0, 10, 100),
                                        (40, -1, 0, 36), (20, -1, 0, 36)])
def test_select_boxes_is_uniters_rule(n, th, lo, hi):
    conf = torch.rand(n, generator=torch.Generator().manual_seed(n))
    keep = select_boxes(conf, th, lo, hi)
    want = min(n, hi) if th == -1 else min(n, compute_num_bb(conf.numpy(), th, lo, hi))
    assert keep.numel() == want
    assert torch.all(conf[keep][:-1] >= conf[keep][1:])                  # decreasing
    rest = conf[~torch.isin(torch.arange(n), keep)]
    if keep.numel() and rest.numel():
        assert conf[keep][-1] >= rest.max()


# ----------------------------------------------------------------------------- images

def _save(img, tmp_path, name, **kw):
    p = str(tmp_path / name)
    img.save(p, **kw)
    return p


def test_image_modes_are_read_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    assert np.array_equal(load_image(_save(Image.fromarray(rgb), tmp_path, "a.png")), rgb)
    g = load_image(_save(Image.fromarray(gray), tmp_path, "g.png"))
    assert np.array_equal(g, np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (7, 5, 1), dtype=np.uint8)], 2)
    assert np.array_equal(load_image(_save(Image.fromarray(rgba), tmp_path, "r.png")), rgb)
    pal = Image.fromarray(rgb).quantize(16)
    want = np.asarray(pal.convert("RGB"))
    assert np.array_equal(load_image(_save(pal, tmp_path, "p.png")), want)
    deep = (gray.astype(np.uint16) << 8) | 7
    got = load_image(_save(Image.fromarray(deep), tmp_path, "d.png"))
    assert np.array_equal(got, np.repeat(gray[..., None], 3, 2))
    # a 1x1 image and in-memory sources
    one = load_image(Image.fromarray(rgb[:1, :1]))
    assert one.shape == (1, 1, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert np.array_equal(load_image(buf.getvalue()), rgb)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[0, 0] = 255                      # a white corner to follow
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6                     # "rotate 90 CW to display"
    p = _save(img, tmp_path, "rot.jpg", exif=exif.tobytes(), quality=100)
    got = load_image(p)
    assert got.shape == (10, 6, 3)
    want = np.asarray(Image.open(p).transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(got, want)


def test_bad_files_raise_a_named_error(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(buf, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[:300])
    for name, pattern in [("text.png", "not an image"), ("trunc.jpg", "cannot be decoded"),
                          ("missing.jpg", "no such file")]:
        with pytest.raises(ImageError, match=pattern) as e:
            load_image(str(tmp_path / name))
        assert name in str(e.value)


@pytest.mark.parametrize("h,w", [(480, 640), (640, 480), (100, 1000), (1, 1), (600, 1001),
                                 (333, 999)])
def test_resize_is_the_caffe_rule(h, w):
    cfg = DetectorConfig()
    nh, nw, s = resized_size(h, w, cfg)
    want = 600 / min(h, w)
    if round(want * max(h, w)) > 1000:
        want = 1000 / max(h, w)
    assert s == pytest.approx(want)
    assert (nh, nw) == (round(h * want), round(w * want))
    assert max(nh, nw) <= 1000


def test_prepare_feeds_bgr_minus_the_caffe_mean():
    red = np.zeros((60, 80, 3), np.uint8)
    red[..., 0] = 200                    # RGB red
    p = prepare(red, DetectorConfig(min_size=30, max_size=100))
    assert p.pixels.shape == (3, 30, 40) and p.scale == pytest.approx(0.5)
    mean = DetectorConfig().pixel_mean                     # BGR
    torch.testing.assert_close(p.pixels[:, 10, 10],
                               torch.tensor([-mean[0], -mean[1], 200 - mean[2]]))


# ----------------------------------------------------------------------------- whole model

def _images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in [(97, 131), (131, 97), (64, 64), (33, 201), (150, 40)]]


@pytest.fixture(scope="module")
def extractor(files):
    return Extractor(load_detector(files["bin"], SMALL), min_bb=3, max_bb=25)


def test_batched_equals_one_at_a_time(extractor):
    imgs = _images()
    batched = extractor(imgs, batch_size=len(imgs))
    for im, rec in zip(imgs, batched):
        [one] = extractor([im], batch_size=1)
        assert rec["features"].shape == one["features"].shape
        np.testing.assert_array_equal(rec["obj_ids"], one["obj_ids"])
        np.testing.assert_allclose(rec["boxes"], one["boxes"], atol=0.02)
        np.testing.assert_allclose(rec["features"], one["features"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rec["soft_labels"], one["soft_labels"], atol=1e-4)
        np.testing.assert_allclose(rec["conf"], one["conf"], atol=1e-4)


def test_records_are_uniters_layout(extractor, files):
    model = load_detector(files["bin"], SMALL)
    imgs = _images()
    for im, rec in zip(imgs, extractor(imgs)):
        h, w = im.shape[:2]
        assert (rec["height"], rec["width"]) == (h, w)
        n = rec["features"].shape[0]
        assert rec["features"].shape == (n, model.cfg.res5_channels)
        assert rec["soft_labels"].shape == (n, model.cfg.num_classes + 1)
        assert 3 <= n <= 25 and n == compute_num_bb(rec["conf"], 0.2, 3, 25)
        assert np.all(np.diff(rec["conf"]) <= 0)
        b = rec["boxes"]
        want = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                         (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
        np.testing.assert_allclose(rec["norm_bb"], want, rtol=1e-6)
        np.testing.assert_allclose(rec["soft_labels"].sum(1), 1, rtol=1e-5)
        # the confidence is a foreground class's probability: soft labels, background first
        # (a box no class's NMS kept has confidence 0: a min_bb filler)
        rows = np.flatnonzero(rec["conf"] > 0)
        np.testing.assert_allclose(rec["soft_labels"][rows, rec["obj_ids"][rows] + 1],
                                   rec["conf"][rows], rtol=1e-6)
        assert rec["attr_ids"].max(initial=0) < model.cfg.num_attrs


def test_features_are_the_mean_of_res5_on_the_proposals(files):
    """The pooled feature of a kept box: RoIPool on res4 at that box, res5, mean (computed
    here from the model's pieces for the kept boxes only)."""
    model = load_detector(files["pkl"], SMALL)
    ext = Extractor(model, min_bb=2, max_bb=6, channels_last=False)
    im = _images()[0]
    rec = ext([im])[0]
    p = ext.prepare(im)
    with torch.no_grad():
        feats, _ = model.backbone(p.pixels[None])
        boxes = torch.from_numpy(rec["boxes"]) * p.scale
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
        x = torch.stack([_roi_pool_plain(feats[0], r[1:], 14, 1 / 16) for r in rois])
        want = model.roi_heads.res5(x).mean((2, 3))
    np.testing.assert_allclose(rec["features"], want.numpy(), rtol=1e-3, atol=1e-3)


def _roi_pool_plain(f, box, size, scale):
    """caffe's ROIPooling for one box, written out."""
    def rnd(v):
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))
    x1, y1, x2, y2 = (rnd(float(v) * scale) for v in box)
    c, hh, ww = f.shape
    rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
    bh, bw = np.float32(rh) / np.float32(size), np.float32(rw) / np.float32(size)
    out = torch.zeros(c, size, size)
    for i in range(size):
        hs = min(max(int(np.floor(np.float32(i) * bh)) + y1, 0), hh)
        he = min(max(int(np.ceil(np.float32(i + 1) * bh)) + y1, 0), hh)
        for j in range(size):
            ws = min(max(int(np.floor(np.float32(j) * bw)) + x1, 0), ww)
            we = min(max(int(np.ceil(np.float32(j + 1) * bw)) + x1, 0), ww)
            if he > hs and we > ws:
                out[:, i, j] = f[:, hs:he, ws:we].amax((1, 2))
    return out


def test_num_bb_and_precisions(files):
    model = load_detector(files["bin"], SMALL)
    imgs = _images()[:2]
    fixed = Extractor(model, num_bb=4)(imgs)
    ref = Extractor(load_detector(files["bin"], SMALL), conf_th=0, min_bb=1, max_bb=1000)(imgs)
    # 4 boxes, or every proposal when an image has fewer
    assert [r["features"].shape[0] for r in fixed] == [min(4, len(r["conf"])) for r in ref]
    # bf16 / fp16 convolutions: finite records, and a backbone that really runs in the low
    # precision (differs from fp32) and stays close to it (random weights make the boxes
    # themselves chaotic; the same-boxes check with real weights is the GPU benchmark's)
    p = Extractor(model).prepare(imgs[0])
    x = p.pixels[None]
    with torch.no_grad():
        want, _ = model.backbone(x)
    for prec in ("bf16", "fp16"):
        low = Extractor(load_detector(files["bin"], SMALL), precision=prec, conf_th=0, min_bb=1,
                        max_bb=1000)
        assert all(np.isfinite(r["features"]).all() and len(r["conf"]) for r in low(imgs[:1]))
        with torch.no_grad(), torch.autocast("cpu", dtype=low.dtype):
            got, _ = low.model.backbone(x)
        assert got.dtype == low.dtype
        rel = ((got.float() - want).abs().mean() / want.abs().mean()).item()
        assert 0 < rel < 0.05, (prec, rel)
    with pytest.raises(ValueError, match="precision must be one of"):
        Extractor(model, precision="fp8")


def test_no_proposal_image_and_api_inputs(files, tmp_path):
    ext = Extractor(load_detector(files["bin"], SMALL), min_bb=1, max_bb=5)
    path = _save(Image.fromarray(_images()[2]), tmp_path, "x.png")
    a, b = ext([path, Image.open(path)])
    np.testing.assert_array_equal(a["features"], b["features"])
    assert ext([]) == []
    assert os.path.exists(path)


def test_the_anchors_key_name():
    assert ANCHORS_KEY == "proposal_generator.anchor_generator.cell_anchors.0"


def test_rpn_proposals_against_a_plain_implementation(files):
    """Top-k anchors by objectness, deltas decoded, clipped, empty boxes dropped, greedy NMS
    0.7, the first post_nms_topk: written out here over the RPN head's own outputs."""
    cfg = SMALL.replace(rpn_pre_nms_topk=300, rpn_post_nms_topk=40)
    model = load_detector(files["pkl"], cfg)
    p = Extractor(model).prepare(_images()[0])
    with torch.no_grad():
        feats, _ = model.backbone(p.pixels[None])
        got = model.proposal_generator(feats, [tuple(feats.shape[2:])], [p.size])[0]
        logits, deltas = model.proposal_generator.rpn_head(feats)
    a = model.cfg.num_anchors
    gh, gw = feats.shape[2:]
    cells = torch.from_numpy(hf_cell_anchors())
    entries = []
    for y in range(gh):
        for x in range(gw):
            for k in range(a):
                anchor = (cells[k] + torch.tensor([16. * x, 16. * y] * 2)).tolist()
                d = deltas[0, 4 * k:4 * k + 4, y, x].tolist()
                entries.append((float(logits[0, k, y, x]), anchor, d))
    entries.sort(key=lambda e: -e[0])
    boxes = []
    ih, iw = p.size
    for score, (x1, y1, x2, y2), (dx, dy, dw, dh) in entries[:300]:
        w, h = x2 - x1, y2 - y1
        dw, dh = min(dw, math.log(1000 / 16)), min(dh, math.log(1000 / 16))
        cx, cy = x1 + w / 2 + dx * w, y1 + h / 2 + dy * h
        pw, ph = math.exp(dw) * w, math.exp(dh) * h
        b = [min(max(cx - pw / 2, 0), iw), min(max(cy - ph / 2, 0), ih),
             min(max(cx + pw / 2, 0), iw), min(max(cy + ph / 2, 0), ih)]
        if b[2] - b[0] > 0 and b[3] - b[1] > 0:
            boxes.append(b)
    kept = []
    for b in boxes:
        if all(_iou(b, k) <= 0.7 for k in kept):
            kept.append(b)
    want = torch.tensor(kept[:40], dtype=torch.float32).reshape(-1, 4)
    assert got.shape == want.shape and got.shape[0] >= 10
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_speed_settings_change_no_result(files):
    """Folded norms, res5 on parity subgrids, channels-last and RoI chunks against the plain
    way (norms apart, dilated convolutions, NCHW, every RoI at once)."""
    imgs = _images()
    fast = Extractor(load_detector(files["bin"], SMALL), min_bb=3, max_bb=25, roi_chunk=7)
    plain = Extractor(load_detector(files["bin"], SMALL), min_bb=3, max_bb=25,
                      channels_last=False, fold_norms=False, subgrids=False, roi_chunk=10**6)
    assert fast.model.roi_heads.subgrids and not plain.model.roi_heads.subgrids
    timings = {}
    recs = fast.run([fast.prepare(im) for im in imgs], timings=timings)
    assert set(timings) == {"backbone", "rpn", "res5_head", "selection"}
    for a, b in zip(recs, plain(imgs, batch_size=1)):
        np.testing.assert_array_equal(a["obj_ids"], b["obj_ids"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.02)
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("r,k,top", [(60, 40, 10), (60, 40, 59), (120, 300, 25), (30, 5, 3),
                                     (200, 1600, 100)])
def test_class_nms_top_is_exact_for_the_kept_boxes(r, k, top):
    """Leaving out the pairs below the top-th first score changes no kept box, its confidence,
    the order, or the count of confidences above a threshold UNITER's rule can reach."""
    g = torch.Generator().manual_seed(r + k + top)
    xy = torch.rand(r, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(r, 2, generator=g) * 40], 1)
    # peaked class distributions, as a trained head's: a few classes per box take the mass
    scores = torch.softmax(torch.randn(r, k + 1, generator=g) * 4, -1)[:, :k]
    full, full_cls = class_nms_max_conf(boxes, scores, 0.3)
    fast, fast_cls = class_nms_max_conf(boxes, scores, 0.3, top=top)
    want = torch.sort(full, descending=True, stable=True).indices[:top]
    got = torch.sort(fast, descending=True, stable=True).indices[:top]
    assert torch.equal(got, want)
    assert torch.equal(fast[got], full[want]) and torch.equal(fast_cls[got], full_cls[want])
    assert torch.all(fast <= full)
    for th in (0.0, 0.1, 0.2, 0.5):
        assert torch.equal(select_boxes(fast, th, 1, top), select_boxes(full, th, 1, top))
