"""Referring-expression datasets (RefCOCO, RefCOCO+, RefCOCOg), drop-in for the original's
``data/re.py``.

A RE text db (UNITER's ``refcoco*_{split}.db``) is an LMDB of one record per expression
(``sent_id``, ``sent``, ``ref_id``, ``ann_id``, ``image_id``, ``bbox`` [x, y, w, h],
``input_ids``) keyed by sentence id, with ``id2len.json``, ``meta.json`` and the RefCOCO
annotations beside it: ``refs.json`` (``ref_id``, ``sent_ids``, ``ann_id``, ``image_id``,
...), ``annotations.json`` (``id``, ``bbox``, ``category_id``, ...), ``categories.json``
(``id``, ``name``) and ``images.json`` (``id``, ``file_name``, ``ann_ids``, ``height``,
``width``).  Image dbs: ``re_coco_gt`` (one box per COCO annotation of the image, in
``ann_ids`` order: ``visual_grounding_coco_gt_{image_id:012}.npz``) and ``re_coco_det``
(detected boxes: ``visual_grounding_det_coco_{image_id:012}.npz``), both read with
``conf_th=-1, num_bb=100`` by the original scripts: records with fewer boxes keep all of them.

* :class:`ReDataset` (training): items with ``targets`` = the index of the referred
  annotation among the image's ``ann_ids`` (ground-truth boxes only).
* :class:`ReEvalDataset` ``(txt_db, img_db, use_gt_feat=True)``: items with the target box,
  every region's box in pixels (``obj_boxes``) and the ``sent_id``; accuracy is
  ``IoU(pred_box, tgt_box) > 0.5`` (:func:`compute_iou`, :mod:`uniter_fast.eval.re`).

Sentences are read in ``refs.json`` order (sentences of ``max_txt_len`` tokens or more are
left out, as in the original; ``-1``: none) and sharded ``ids[rank::world_size]``.
:meth:`ReDetectFeatTxtTokDataset.shuffle` reorders the refs with an RNG seeded from
``(seed, epoch)``; the original's ``shuffle`` shuffled the text db's list but not the
dataset's ids, so its order never changed.
"""
from __future__ import annotations

import os
import random
import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from .collate import _common
from .datasets import img_pos_feat
from .db import (
    DbError,
    DetectFeatLmdb,
    TxtTokLmdb,
    _atomic_json,
    _load_json,
    check_token_ids,
    write_txt_db,
)

__all__ = ["ReTxtTokLmdb", "ReDetectFeatTxtTokDataset", "ReDataset", "ReEvalDataset",
           "re_collate", "re_eval_collate", "compute_iou", "re_gt_img_name", "re_det_img_name",
           "write_re_txt_db", "RE_ANNOTATION_FILES"]

#: the RefCOCO annotation files beside the LMDB
RE_ANNOTATION_FILES = ("refs.json", "annotations.json", "categories.json", "images.json")


def re_gt_img_name(image_id: Any) -> str:
    """Record name of an image's ground-truth boxes in ``re_coco_gt``."""
    return f"visual_grounding_coco_gt_{int(image_id):012}.npz"


def re_det_img_name(image_id: Any) -> str:
    """Record name of an image's detected boxes in ``re_coco_det``."""
    return f"visual_grounding_det_coco_{int(image_id):012}.npz"


def compute_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes exactly as UNITER's ``computeIoU``: the corners are
    inclusive pixels (``x2 = x + w - 1``, intersection ``(x2 - x1 + 1)(y2 - y1 + 1)``), an
    intersection counts only when ``x1 < x2`` and ``y1 < y2`` strictly, and the union is
    ``w1 h1 + w2 h2 - inter``."""
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def _by_id(items: Any, path: str, key: str = "id") -> Dict[Any, Dict[str, Any]]:
    if not isinstance(items, list) or not all(isinstance(x, dict) and key in x for x in items):
        raise DbError(f"{path}: expected a list of objects with {key!r}")
    return {x[key]: x for x in items}


class ReTxtTokLmdb(TxtTokLmdb):
    """RE text db: the LMDB plus ``Refs``, ``Anns``, ``Cats`` (id -> name) and ``Images``."""

    def __init__(self, db_dir: str, max_txt_len: int = 120):
        super().__init__(db_dir, max_txt_len)
        d = self.db_dir
        refs = _load_json(os.path.join(d, "refs.json"), "RE text db")
        self.Refs = _by_id(refs, os.path.join(d, "refs.json"), "ref_id")
        self.ref_ids = [r["ref_id"] for r in refs]
        self.Anns = _by_id(_load_json(os.path.join(d, "annotations.json"), "RE text db"),
                           os.path.join(d, "annotations.json"))
        cats = _by_id(_load_json(os.path.join(d, "categories.json"), "RE text db"),
                      os.path.join(d, "categories.json"))
        self.Cats = {k: c.get("name") for k, c in cats.items()}
        self.Images = _by_id(_load_json(os.path.join(d, "images.json"), "RE text db"),
                             os.path.join(d, "images.json"))
        self.max_txt_len = max_txt_len
        for r in refs:
            if not isinstance(r.get("sent_ids"), list) or "image_id" not in r:
                raise DbError(f"RE text db {d}: refs.json entry {r.get('ref_id')!r} lacks "
                              "sent_ids/image_id")
        self.sent2image = {str(s): r["image_id"] for r in refs for s in r["sent_ids"]}
        self.sent_ids = self._get_sent_ids()

    def _get_sent_ids(self) -> List[str]:
        """Sentence ids in ref order, shorter than ``max_txt_len`` (all with -1)."""
        out = []
        for ref_id in self.ref_ids:
            for sent_id in self.Refs[ref_id]["sent_ids"]:
                n = self.id2len.get(str(sent_id))
                if n is not None and (self.max_txt_len == -1 or n < self.max_txt_len):
                    out.append(str(sent_id))
        return out

    def shuffle(self, rng: Optional[random.Random] = None) -> None:
        """Shuffle the refs (``rng``, else Python's global RNG as the original) and rebuild
        ``sent_ids``."""
        (rng or random).shuffle(self.ref_ids)
        self.sent_ids = self._get_sent_ids()

    def __getitem__(self, id_: str) -> Dict[str, Any]:
        dump = self._load(id_)
        where = f"RE text db {self.db_dir}: record {id_!r}"
        if not isinstance(dump, dict):
            raise DbError(f"{where} is not a dict")
        missing = [k for k in ("input_ids", "image_id", "ann_id", "bbox") if k not in dump]
        if missing:
            raise DbError(f"{where} lacks {missing}")
        check_token_ids(dump["input_ids"], where, nonempty=True)
        box = dump["bbox"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)):
            raise DbError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
        if dump["image_id"] not in self.Images:
            raise DbError(f"{where}: image_id {dump['image_id']!r} is not in images.json")
        return dump


class ReDetectFeatTxtTokDataset(Dataset):
    """Base of the RE datasets: this rank's sentence ids and their ``lens``."""

    def __init__(self, txt_db: ReTxtTokLmdb, img_db: DetectFeatLmdb, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not isinstance(txt_db, ReTxtTokLmdb) or not isinstance(img_db, DetectFeatLmdb):
            raise ValueError("expected a ReTxtTokLmdb and a DetectFeatLmdb")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.txt_db, self.img_db = txt_db, img_db
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, int(seed), 0
        self._set_ids(txt_db.sent_ids)

    def _set_ids(self, sent_ids: List[str]) -> None:
        self.ids = sent_ids[self.rank::self.world_size]
        if not self.ids:
            raise ValueError(f"RE text db {self.txt_db.db_dir}: rank {self.rank}/"
                             f"{self.world_size} has no sentences ({len(sent_ids)} in total)")
        self.lens = [self.txt_db.id2len[s] + self.img_db.nbb(self._img_name(s))
                     for s in self.ids]

    def _img_name(self, sent_id: str) -> str:
        return re_gt_img_name(self.txt_db.sent2image[sent_id])

    def __len__(self) -> int:
        return len(self.ids)

    def shuffle(self) -> None:
        """Next epoch's order: the refs shuffled by an RNG seeded from ``(seed, epoch)``."""
        self.epoch += 1
        rng = random.Random((self.seed << 32) ^ zlib.crc32(f"re\x00{self.epoch}".encode()))
        self.txt_db.shuffle(rng)
        self._set_ids(self.txt_db.sent_ids)

    def _example(self, i: int):
        ex = self.txt_db[self.ids[i]]
        feat, norm_bb = self.img_db[self._img_name_of(ex)]
        feat, pos = torch.tensor(feat), img_pos_feat(torch.tensor(norm_bb))
        input_ids = torch.tensor(self.txt_db.combine_inputs(ex["input_ids"]))
        return ex, input_ids, feat, pos

    def _img_name_of(self, ex: Dict[str, Any]) -> str:
        return re_gt_img_name(ex["image_id"])

    @staticmethod
    def _item(input_ids, feat, pos) -> Dict[str, torch.Tensor]:
        n = feat.size(0)
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + n, dtype=torch.long),
                "obj_masks": torch.zeros(n, dtype=torch.uint8)}


class ReDataset(ReDetectFeatTxtTokDataset):
    """Training items: the expression, the image's ground-truth boxes and ``target``."""

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ex, input_ids, feat, pos = self._example(i)
        img = self.txt_db.Images[ex["image_id"]]
        where = f"RE text db {self.txt_db.db_dir}: record {self.ids[i]!r}"
        ann_ids = img.get("ann_ids")
        if not isinstance(ann_ids, list) or len(ann_ids) != feat.size(0):
            raise DbError(f"{where}: image {ex['image_id']!r} has "
                          f"{len(ann_ids) if isinstance(ann_ids, list) else ann_ids!r} "
                          f"annotations but image db {self.img_db.img_dir} record "
                          f"{self._img_name_of(ex)!r} has {feat.size(0)} boxes (training "
                          "needs the ground-truth boxes, visual_grounding_coco_gt)")
        if ex["ann_id"] not in ann_ids:
            raise DbError(f"{where}: ann_id {ex['ann_id']!r} is not among image "
                          f"{ex['image_id']!r}'s ann_ids")
        item = self._item(input_ids, feat, pos)
        item["target"] = torch.tensor([ann_ids.index(ex["ann_id"])])
        return item


def re_collate(inputs: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """The original's RE training batch: encoder keys, ``obj_masks`` [n, max_num_bb] (uint8,
    padded with 1), ``targets`` [n, 1], ``txt_lens`` and ``num_bbs`` (lists)."""
    batch, txt_lens, num_bbs = _common(inputs)
    batch["obj_masks"] = pad_sequence([x["obj_masks"] for x in inputs], batch_first=True,
                                      padding_value=1)
    if "target" in inputs[0]:
        batch["targets"] = torch.stack([x["target"] for x in inputs], dim=0)
    batch["txt_lens"], batch["num_bbs"] = txt_lens, num_bbs
    return batch


class ReEvalDataset(ReDetectFeatTxtTokDataset):
    """Evaluation items on ground-truth (``use_gt_feat``) or detected boxes: ``tgt_box``
    and ``obj_boxes`` [num_bb, 4] in pixels (x, y, w, h) and ``sent_id``."""

    def __init__(self, txt_db: ReTxtTokLmdb, img_db: DetectFeatLmdb, use_gt_feat: bool = True,
                 **kw):
        self.use_gt_feat = bool(use_gt_feat)
        super().__init__(txt_db, img_db, **kw)

    def _img_name(self, sent_id: str) -> str:
        image_id = self.txt_db.sent2image[sent_id]
        return re_gt_img_name(image_id) if self.use_gt_feat else re_det_img_name(image_id)

    def _img_name_of(self, ex: Dict[str, Any]) -> str:
        return (re_gt_img_name(ex["image_id"]) if self.use_gt_feat
                else re_det_img_name(ex["image_id"]))

    def __getitem__(self, i: int) -> Dict[str, Any]:
        ex, input_ids, feat, pos = self._example(i)
        img = self.txt_db.Images[ex["image_id"]]
        try:
            w, h = float(img["width"]), float(img["height"])
        except (KeyError, TypeError, ValueError):
            raise DbError(f"RE text db {self.txt_db.db_dir}: images.json entry "
                          f"{ex['image_id']!r} lacks a numeric width/height") from None
        p = pos.numpy()
        item = self._item(input_ids, feat, pos)
        item["obj_boxes"] = np.stack([p[:, 0] * w, p[:, 1] * h, p[:, 4] * w, p[:, 5] * h], axis=1)
        item["tgt_box"] = np.array(ex["bbox"])
        item["sent_id"] = self.ids[i]
        return item

    computeIoU = staticmethod(compute_iou)


def re_eval_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """:func:`re_collate` without targets, plus ``tgt_box``, ``obj_boxes`` and ``sent_ids``
    (lists)."""
    batch = re_collate(inputs)
    batch["tgt_box"] = [x["tgt_box"] for x in inputs]
    batch["obj_boxes"] = [x["obj_boxes"] for x in inputs]
    batch["sent_ids"] = [x["sent_id"] for x in inputs]
    return batch


def write_re_txt_db(db_dir: str, sents: Dict[str, Dict[str, Any]], refs: List[Dict[str, Any]],
                    annotations: List[Dict[str, Any]], categories: List[Dict[str, Any]],
                    images: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """Write a RE text db in UNITER's layout: ``sents`` (sentence id -> record with
    ``input_ids``, ``image_id``, ``ann_id``, ``bbox``, ...) and the annotation lists."""
    records = {k: dict(v, img_fname=re_gt_img_name(v["image_id"])) for k, v in sents.items()}
    write_txt_db(db_dir, records, meta)
    for name, obj in zip(RE_ANNOTATION_FILES, (refs, annotations, categories, images)):
        _atomic_json(os.path.join(db_dir, name), obj)
