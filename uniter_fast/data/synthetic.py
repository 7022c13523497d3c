"""A small *grounded* image-text dataset, written in UNITER's own db format.

There are ``num_classes`` object classes, each with a prototype region feature.
An image has a few object regions (noisy prototypes with random boxes) plus
low-confidence clutter regions; a simulated detector gives each region a soft
label over ``num_classes + 1`` classes (background at index 0) and a confidence.
Each caption names every object of its image from a small template vocabulary,
in random order.  So:

* MLM of an object word needs the image (the template words do not tell which
  object it is);
* ITM separates a caption from a swapped image (its object set differs);
* MRC's labels are the classes, MRFR's targets the prototypes (+ noise);
* WRA can align each object word with its region.

Everything is deterministic from ``seed``.  :func:`ensure_synthetic` generates
the dbs into a cache directory (``$UNITER_FAST_CACHE`` or
``~/.cache/uniter_fast``) once, atomically: it writes into a temporary
directory and renames it into place only when complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from .db import write_img_db, write_txt_db

__all__ = ["SyntheticSpec", "ensure_synthetic", "generate_synthetic", "cache_root",
           "SPECIAL_TOKENS", "TEMPLATE_WORDS", "CLASS_NAMES", "build_vocab"]

FORMAT_VERSION = 1

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEMPLATE_WORDS = ["a", "photo", "of", "and", "there", "is", "in", "the", "picture", "an",
                  "image", "showing", "we", "see", ",", "."]
CLASS_NAMES = ["cat", "dog", "bird", "car", "tree", "cup", "ball", "chair", "boat", "lamp",
               "horse", "book", "clock", "bike", "kite", "shoe", "apple", "house", "fish",
               "train"]
# caption templates: {objs} is "a X , a Y and a Z"
TEMPLATES = {"long": ["a photo of {objs} .", "there is {objs} in the picture .",
                      "an image showing {objs} .", "we see {objs} ."],
             "short": ["{objs}", "{objs} .", "a {objs}"]}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    num_classes: int = 10
    num_train_images: int = 600
    num_val_images: int = 100
    captions_per_image: int = 2
    min_objects: int = 1
    max_objects: int = 6
    regions_per_image: int = 8          # objects + low-confidence clutter, before the nbb rule
    feat_dim: int = 2048
    feat_noise: float = 0.3
    detector_logit: float = 4.0          # true-class logit boost of the simulated detector
    detector_noise: float = 0.5
    conf_th: float = 0.2
    max_bb: int = 8
    min_bb: int = 2
    caption_style: str = "short"         # "long" (sentence templates) or "short" (names only)

    def validate(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {self.num_classes}")
        if not 1 <= self.min_objects <= self.max_objects <= self.num_classes:
            raise ValueError("need 1 <= min_objects <= max_objects <= num_classes")
        if self.regions_per_image < max(self.max_objects, self.min_bb):
            raise ValueError("regions_per_image must be >= max(max_objects, min_bb)")
        if self.caption_style not in TEMPLATES:
            raise ValueError(f"caption_style must be one of {sorted(TEMPLATES)}")
        if self.num_train_images < 2 or self.num_val_images < 2 or self.captions_per_image < 1:
            raise ValueError("need >= 2 train and val images and >= 1 caption per image")

    @property
    def img_label_dim(self) -> int:
        return self.num_classes + 1

    def key(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_vocab(num_classes: int) -> List[str]:
    return SPECIAL_TOKENS + TEMPLATE_WORDS + CLASS_NAMES[:num_classes]


def cache_root() -> str:
    root = os.environ.get("UNITER_FAST_CACHE")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "uniter_fast")
    return root


def _make_image(rng: np.random.Generator, spec: SyntheticSpec, protos: np.ndarray):
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    classes = rng.choice(spec.num_classes, size=n_obj, replace=False) + 1   # 1..K
    n_reg = spec.regions_per_image
    true = np.concatenate([classes, np.zeros(n_reg - n_obj, dtype=np.int64)])
    # simulated detector: noisy logits with a boost on the true class
    logits = rng.normal(0.0, spec.detector_noise, size=(n_reg, spec.num_classes + 1))
    logits[np.arange(n_reg), true] += spec.detector_logit
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    conf = soft[:, 1:].max(1)
    feats = protos[true] + rng.normal(0.0, spec.feat_noise, size=(n_reg, spec.feat_dim))
    feats = np.maximum(feats, 0.0)                      # detector features are post-ReLU
    xy = rng.uniform(0.0, 0.6, size=(n_reg, 2))
    wh = rng.uniform(0.15, 0.4, size=(n_reg, 2))
    norm_bb = np.concatenate([xy, xy + wh, wh], axis=1)
    order = np.argsort(-conf, kind="stable")            # detectors emit boxes by confidence
    dump = {"features": feats[order].astype(np.float32),
            "norm_bb": norm_bb[order].astype(np.float32),
            "conf": conf[order].astype(np.float32),
            "soft_labels": soft[order].astype(np.float32)}
    return dump, [int(c) for c in classes]


def _caption(rng: np.random.Generator, classes: List[int], tok: Dict[str, int],
             style: str = "long"):
    names = [CLASS_NAMES[c - 1] for c in rng.permutation(classes)]
    parts = [f"a {n}" for n in names] if style == "long" else names
    objs = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    templates = TEMPLATES[style]
    text = templates[int(rng.integers(len(templates)))].format(objs=objs)
    return [tok[w] for w in text.split()], text


def generate_synthetic(out_dir: str, spec: SyntheticSpec) -> Dict[str, str]:
    """Write ``img/``, ``txt_train.db/``, ``txt_val.db/`` and ``spec.json`` under out_dir."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    vocab = build_vocab(spec.num_classes)
    tok = {w: i for i, w in enumerate(vocab)}
    # background prototype (class 0) + one per class; sparse, non-negative
    protos = np.abs(rng.normal(0.0, 1.0, size=(spec.num_classes + 1, spec.feat_dim)))
    protos *= rng.random(size=protos.shape) < 0.5
    protos[0] *= 0.3
    dumps, txt = {}, {"train": {}, "val": {}}
    n_total = spec.num_train_images + spec.num_val_images
    for i in range(n_total):
        split = "train" if i < spec.num_train_images else "val"
        fname = f"synthetic_{split}_{i:06d}.npz"
        dump, classes = _make_image(rng, spec, protos)
        dumps[fname] = dump
        for j in range(spec.captions_per_image):
            ids, text = _caption(rng, classes, tok, spec.caption_style)
            txt[split][f"{split}_{i:06d}_{j}"] = {"input_ids": ids, "img_fname": fname,
                                                   "caption": text, "classes": classes}
    write_img_db(os.path.join(out_dir, "img"), dumps, conf_th=spec.conf_th,
                 max_bb=spec.max_bb, min_bb=spec.min_bb)
    meta = {"CLS": tok["[CLS]"], "SEP": tok["[SEP]"], "MASK": tok["[MASK]"], "UNK": tok["[UNK]"],
            "PAD": tok["[PAD]"], "v_range": [len(SPECIAL_TOKENS), len(vocab)],
            "bert": "synthetic", "vocab": vocab, "img_label_dim": spec.img_label_dim}
    for split in ("train", "val"):
        write_txt_db(os.path.join(out_dir, f"txt_{split}.db"), txt[split], meta)
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump({"version": FORMAT_VERSION, **dataclasses.asdict(spec)}, f, indent=1)
    return {"img": os.path.join(out_dir, "img"), "train": os.path.join(out_dir, "txt_train.db"),
            "val": os.path.join(out_dir, "txt_val.db")}


def ensure_synthetic(spec: Optional[SyntheticSpec] = None, cache_dir: Optional[str] = None
                     ) -> Dict[str, Any]:
    """Path dict ``{"root", "img", "train", "val", "spec"}`` of the synthetic dbs,
    generating them on first use (atomically: temp dir, then rename)."""
    spec = spec or SyntheticSpec()
    spec.validate()
    root = cache_dir or cache_root()
    final = os.path.join(root, f"synthetic-{spec.key()}")
    done = os.path.join(final, "spec.json")
    if not os.path.exists(done):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=root)
        try:
            generate_synthetic(tmp, spec)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.exists(done):   # not a concurrent winner: a real failure
                    raise
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return {"root": final, "img": os.path.join(final, "img"),
            "train": os.path.join(final, "txt_train.db"),
            "val": os.path.join(final, "txt_val.db"), "spec": spec}
