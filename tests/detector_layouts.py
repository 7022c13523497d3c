"""The public bottom-up-attention weights files, generated: same key names and shapes as
``faster_rcnn_from_caffe_attr.pkl`` (py-bottom-up-attention, detectron2 names, a pickle of
numpy arrays) and ``pytorch_model.bin`` of ``unc-nlp/frcnn-vg-finetuned`` (Hugging Face,
the same names plus the RPN's cell anchors and BatchNorm's ``num_batches_tracked``), with
random values.  The key list is written here from the public models' structure, not read off
``uniter_fast``'s modules, so a naming slip on either side fails the loading tests."""
import math
import pickle
from collections import OrderedDict

import numpy as np
import torch

#: the real files' network (ResNet-101 C4, VG 1600 classes / 400 attributes)
REAL = dict(blocks=(3, 4, 23), res5_blocks=3, stem=64, res2=256, mid=64, rpn=512,
            classes=1600, attrs=400, anchors=12)
#: a small network of the same structure for fast tests
TINY = dict(blocks=(1, 2, 1), res5_blocks=2, stem=8, res2=16, mid=4, rpn=8, classes=7, attrs=5,
            anchors=12)


def _conv_norm(out, prefix, cout, cin, k):
    out[prefix + ".weight"] = (cout, cin, k, k)
    for n in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.norm.{n}"] = (cout,)


def _stage(out, prefix, n, cin, mid, cout):
    for i in range(n):
        p = f"{prefix}.{i}"
        if i == 0:
            _conv_norm(out, p + ".shortcut", cout, cin, 1)
        _conv_norm(out, p + ".conv1", mid, cin if i == 0 else cout, 1)
        _conv_norm(out, p + ".conv2", mid, mid, 3)
        _conv_norm(out, p + ".conv3", cout, mid, 1)


def public_shapes(net=REAL):
    """{key: shape} of detectron2's names for the VG detector (no anchors, no BN counters)."""
    out = OrderedDict()
    _conv_norm(out, "backbone.stem.conv1", net["stem"], 3, 7)
    c2, m = net["res2"], net["mid"]
    _stage(out, "backbone.res2", net["blocks"][0], net["stem"], m, c2)
    _stage(out, "backbone.res3", net["blocks"][1], c2, m * 2, c2 * 2)
    _stage(out, "backbone.res4", net["blocks"][2], c2 * 2, m * 4, c2 * 4)
    a, r = net["anchors"], net["rpn"]
    out["proposal_generator.rpn_head.conv.weight"] = (r, c2 * 4, 3, 3)
    out["proposal_generator.rpn_head.conv.bias"] = (r,)
    out["proposal_generator.rpn_head.objectness_logits.weight"] = (a, r, 1, 1)
    out["proposal_generator.rpn_head.objectness_logits.bias"] = (a,)
    out["proposal_generator.rpn_head.anchor_deltas.weight"] = (a * 4, r, 1, 1)
    out["proposal_generator.rpn_head.anchor_deltas.bias"] = (a * 4,)
    _stage(out, "roi_heads.res5", net["res5_blocks"], c2 * 4, m * 8, c2 * 8)
    d, c = c2 * 8, net["classes"]
    p = "roi_heads.box_predictor"
    out[p + ".cls_score.weight"] = (c + 1, d)
    out[p + ".cls_score.bias"] = (c + 1,)
    out[p + ".bbox_pred.weight"] = (c * 4, d)
    out[p + ".bbox_pred.bias"] = (c * 4,)
    if net["attrs"]:
        out[p + ".cls_embedding.weight"] = (c + 1, d // 8)
        out[p + ".fc_attr.weight"] = (d // 4, d + d // 8)
        out[p + ".fc_attr.bias"] = (d // 4,)
        out[p + ".attr_score.weight"] = (net["attrs"] + 1, d // 4)
        out[p + ".attr_score.bias"] = (net["attrs"] + 1,)
    return out


def random_weights(net=TINY, seed=0):
    """float32 numpy arrays with the public shapes: He-scaled convolutions, norms near
    identity (activations stay finite through the network)."""
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for k, shape in public_shapes(net).items():
        if k.endswith("norm.weight"):
            v = rng.uniform(0.5, 1.0, shape)
        elif k.endswith("norm.running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        elif k.endswith(("norm.bias", "norm.running_mean")):
            v = rng.normal(0, 0.1, shape)
        elif k.endswith(".bias"):
            v = rng.normal(0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            v = rng.normal(0, math.sqrt(2.0 / fan_in), shape)
        out[k] = v.astype(np.float32)
    # class logits spread out, so classes and confidences vary between boxes
    out["roi_heads.box_predictor.cls_score.weight"] *= 8
    # small RPN deltas: proposals near their anchors, so many distinct boxes survive NMS
    out["proposal_generator.rpn_head.anchor_deltas.weight"] *= 0.02
    out["proposal_generator.rpn_head.anchor_deltas.bias"] *= 0.02
    return out


def hf_cell_anchors(sizes=(64, 128, 256, 512), ratios=(0.5, 1.0, 2.0)):
    """The HF demo's stored anchors: centred on 0, size-major (written out independently)."""
    rows = []
    for s in sizes:
        for a in ratios:
            w = math.sqrt(s * s / a)
            rows.append([-w / 2, -a * w / 2, w / 2, a * w / 2])
    return np.array(rows, dtype=np.float32)


def write_pkl(path, weights, with_stats=True, extra=None):
    """detectron2's pkl: {"model": {name: array}, "__author__": ...}.  ``with_stats=False``:
    frozen norms as weight and bias only (as detectron2's caffe conversions)."""
    model = OrderedDict((k, v) for k, v in weights.items()
                        if with_stats or not k.endswith(("running_mean", "running_var")))
    model.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "generated for tests"}, f, protocol=2)


def write_bin(path, weights, anchors=None, bn_counters=True):
    """The HF demo's ``pytorch_model.bin``: a torch state dict with the cell anchors (and the
    BatchNorm counters of an nn.BatchNorm2d)."""
    sd = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in weights.items())
    if bn_counters:
        for k in list(sd):
            if k.endswith("norm.running_var"):
                sd[k[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    sd["proposal_generator.anchor_generator.cell_anchors.0"] = torch.from_numpy(
        hf_cell_anchors() if anchors is None else anchors)
    torch.save(sd, path)
