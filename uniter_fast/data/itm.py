"""Image-text retrieval datasets, drop-in for the ranking part of the original's ``data/itm.py``.

Over UNITER's retrieval text dbs (``itm_flickr30k_*.db``, ``itm_coco_*.db``: one record
per caption, ``txt2img.json`` / ``img2txts.json``) and their image dbs.  As every dataset
here, each holds this rank's shard of the caption ids (``ids[rank::world_size]``, the
original's ``get_ids_and_lens``) and draws its randomness from ``(seed, epoch, caption id)``
(:func:`~uniter_fast.data.datasets.example_rng`), so negatives do not depend on DataLoader
workers and a resumed run (same seed, ``set_epoch``) draws the same ones.

Training (``itm_rank_collate`` / ``itm_rank_hn_collate`` give the original's batches):

* :class:`ItmRankDataset` ``(txt_db, img_db, neg_sample_size=1)``: per caption the positive
  pair, ``neg_sample_size`` (caption, other image) pairs and ``neg_sample_size`` (other
  caption, image) pairs, negatives drawn from this rank's shard.  Batch rows come in
  groups of ``1 + 2 * neg_sample_size`` (``sample_size``), positive first.
* :class:`ItmRankDatasetHardNegFromText`: one caption, its image and ``neg_sample_size``
  other images (from the whole db) as a ready batch (``input_ids`` [1, L]).
* :class:`ItmRankDatasetHardNegFromImage`: one image, its caption and ``neg_sample_size``
  captions of other images (from this rank's shard) as a ready batch (``img_feat``
  [1, N, d]).

Evaluation:

* :class:`ItmValDataset` ``(txt_db, img_db, mini_batch_size=400)``: a caption against its
  image and the next ``mini_batch_size - 1`` images of ``all_img_ids`` (wrapping around).
* :class:`ItmEvalDataset`: a caption against every image, as a list of mini-batches over
  ``all_img_ids`` sorted by box count (the original's full-ranking loop; the fast scorer
  :func:`uniter_fast.eval.itr.itm_dataset_scores` computes the same scores).

Difference from the original: ``ItmRankDatasetHardNegFromImage`` builds ``gather_index``
with the padded text length; the original passed the *last* caption's length, so when the
last negative caption was not the longest the image rows gathered text positions.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from .collate import _common, get_gather_index, pad_tensors
from .datasets import DetectFeatTxtTokDataset
from .db import DbError, DetectFeatLmdb, TxtTokLmdb

__all__ = ["ItmRankDataset", "ItmRankDatasetHardNegFromText", "ItmRankDatasetHardNegFromImage",
           "ItmValDataset", "ItmEvalDataset", "itm_rank_collate", "itm_rank_hn_collate",
           "itm_val_collate", "itm_eval_collate", "NegativePool"]

#: tries of "sample, reject on overlap with the ground truth" before sampling the
#: complement directly (both give a uniform draw among the non-ground-truth items)
_NEG_RETRIES = 8


class NegativePool:
    """Items to draw negatives from (the original's ``sample_negative``)."""

    def __init__(self, items: Iterable[str], what: str):
        self.items: List[str] = list(items)
        self._set = set(self.items)
        self.what = what

    def sample(self, rng, ground_truths: Sequence[str], k: int) -> List[str]:
        """``k`` distinct items, none in ``ground_truths``, uniformly."""
        gt = set(ground_truths)
        n_ok = len(self.items) - sum(1 for g in gt if g in self._set)
        if n_ok < k:
            raise ValueError(f"cannot draw {k} negative {self.what}: only {n_ok} of the "
                             f"{len(self.items)} are not ground truths")
        for _ in range(_NEG_RETRIES):
            out = rng.sample(self.items, k)
            if not any(o in gt for o in out):
                return out
        return rng.sample([x for x in self.items if x not in gt], k)


def _input_ids(txt_db: TxtTokLmdb, txt_id: str) -> torch.Tensor:
    """[CLS] caption [SEP] of a caption id (DbError naming db and key if empty)."""
    ids = txt_db[txt_id]["input_ids"]
    if len(ids) == 0:
        raise DbError(f"text db {txt_db.db_dir}: record {txt_id!r} is empty")
    return torch.tensor(txt_db.combine_inputs(ids))


def _image_of(txt2img: Dict[str, Any], txt_id: str, txt_db: TxtTokLmdb) -> str:
    try:
        img = txt2img[txt_id]
    except KeyError:
        raise DbError(f"text db {txt_db.db_dir}: txt2img.json has no image for id "
                      f"{txt_id!r}") from None
    if not isinstance(img, str):
        raise DbError(f"text db {txt_db.db_dir}: txt2img.json maps {txt_id!r} to {img!r}; "
                      "a retrieval db has one image per caption")
    return img


def _img2txts(txt_db: TxtTokLmdb) -> Dict[str, List[str]]:
    m = txt_db.img2txts
    if not isinstance(m, dict) or not all(isinstance(v, list) for v in m.values()):
        raise DbError(f"text db {txt_db.db_dir}: img2txts.json must map image -> list of ids")
    return m


def _check_neg_size(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"neg_sample_size must be an int >= 1, got {n!r}")


def _pair(input_ids: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
            "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long)}


def _one_text_batch(input_ids: torch.Tensor, feats: List[torch.Tensor],
                    poss: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One caption against several images: ``input_ids`` [1, L] (the original's layout)."""
    tl = input_ids.size(0)
    num_bbs = [f.size(0) for f in feats]
    n = len(feats)
    attn = torch.zeros(n, max(num_bbs) + tl, dtype=torch.long)
    for r, nbb in enumerate(num_bbs):
        attn[r, :tl + nbb] = 1
    return {"input_ids": input_ids.unsqueeze(0),
            "position_ids": torch.arange(tl, dtype=torch.long).unsqueeze(0),
            "img_feat": pad_tensors(feats, num_bbs), "img_pos_feat": pad_tensors(poss, num_bbs),
            "attn_masks": attn,
            "gather_index": get_gather_index([tl] * n, num_bbs, n, tl, attn.size(1))}


class _ItmBase(DetectFeatTxtTokDataset):
    task = "itm-rank"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, **kw):
        super().__init__(txt_db, img_db, **kw)
        self.txt2img = {id_: _image_of(txt_db.txt2img, id_, txt_db) for id_ in self.ids}

    def _img_feat(self, fname: str):
        feat, pos = self._img(fname)
        return feat, pos, feat.size(0)


class ItmRankDataset(_ItmBase):
    """Positive + ``neg_sample_size`` negative images + ``neg_sample_size`` negative
    captions per caption (items: lists of pair dicts; :func:`itm_rank_collate`)."""

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, neg_sample_size: int = 1,
                 **kw):
        _check_neg_size(neg_sample_size)
        super().__init__(txt_db, img_db, **kw)
        # negatives from this rank's shard (the original: "images partitioned by rank")
        self.img2txts: Dict[str, List[str]] = defaultdict(list)
        for id_, img in self.txt2img.items():
            self.img2txts[img].append(id_)
        self.img_name_list = list(self.img2txts)
        self.neg_sample_size = neg_sample_size
        self._neg_imgs = NegativePool(self.img_name_list, "images")
        self._neg_txts = NegativePool(self.ids, "captions")

    def id_pairs(self, i: int) -> List[tuple]:
        """(caption id, image) of the item's rows: the positive, negative images, negative
        captions."""
        rng = self._rng(i)
        gt_txt = self.ids[i]
        gt_img = self.txt2img[gt_txt]
        neg_imgs = self._neg_imgs.sample(rng, [gt_img], self.neg_sample_size)
        neg_txts = self._neg_txts.sample(rng, self.img2txts[gt_img], self.neg_sample_size)
        return ([(gt_txt, gt_img)] + [(gt_txt, img) for img in neg_imgs]
                + [(txt, gt_img) for txt in neg_txts])

    def __getitem__(self, i: int) -> List[Dict[str, torch.Tensor]]:
        out = []
        for txt_id, img in self.id_pairs(i):
            feat, pos, _ = self._img_feat(img)
            out.append(_pair(_input_ids(self.txt_db, txt_id), feat, pos))
        return out


def itm_rank_collate(inputs: List[List[Dict[str, torch.Tensor]]]) -> Dict[str, Any]:
    """The original's ranking batch: the groups' rows one after another, plus
    ``sample_size`` (rows per group)."""
    if not inputs:
        raise ValueError("cannot collate an empty batch")
    sample_size = len(inputs[0])
    if any(len(x) != sample_size for x in inputs):
        raise ValueError(f"itm_rank_collate: groups of different sizes "
                         f"{sorted({len(x) for x in inputs})}")
    batch, _, _ = _common([pair for group in inputs for pair in group])
    batch["sample_size"] = sample_size
    return batch


class ItmRankDatasetHardNegFromText(_ItmBase):
    """One caption against its image and ``neg_sample_size`` other images of the whole db
    (a ready batch; gt first)."""
    task = "itm-hn-t"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, neg_sample_size: int = 1,
                 **kw):
        _check_neg_size(neg_sample_size)
        super().__init__(txt_db, img_db, **kw)
        self.img2txts = _img2txts(txt_db)
        self.img_name_list = list(self.img2txts)
        self.neg_sample_size = neg_sample_size
        self._neg_imgs = NegativePool(self.img_name_list, "images")

    def img_ids(self, i: int) -> List[str]:
        gt_img = self.txt2img[self.ids[i]]
        return [gt_img] + self._neg_imgs.sample(self._rng(i), [gt_img], self.neg_sample_size)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        input_ids = _input_ids(self.txt_db, self.ids[i])
        feats, poss = zip(*(self._img(f) for f in self.img_ids(i)))
        return _one_text_batch(input_ids, list(feats), list(poss))


class ItmRankDatasetHardNegFromImage(_ItmBase):
    """One image against its caption and ``neg_sample_size`` captions of other images from
    this rank's shard (a ready batch; gt first)."""
    task = "itm-hn-i"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, neg_sample_size: int = 1,
                 **kw):
        _check_neg_size(neg_sample_size)
        super().__init__(txt_db, img_db, **kw)
        self.img2txts = _img2txts(txt_db)
        self.txt_name_list = list(self.txt2img)
        self.neg_sample_size = neg_sample_size
        self._neg_txts = NegativePool(self.txt_name_list, "captions")

    def txt_ids(self, i: int) -> List[str]:
        gt_txt = self.ids[i]
        gt_img = self.txt2img[gt_txt]
        gts = self.img2txts.get(gt_img, [gt_txt])
        return [gt_txt] + self._neg_txts.sample(self._rng(i), gts, self.neg_sample_size)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        feat, pos, nbb = self._img_feat(self.txt2img[self.ids[i]])
        texts = [_input_ids(self.txt_db, t) for t in self.txt_ids(i)]
        txt_lens = [len(t) for t in texts]
        input_ids = pad_sequence(texts, batch_first=True, padding_value=0)
        n, max_tl = input_ids.shape
        attn = torch.zeros(n, max_tl + nbb, dtype=torch.long)
        for r, tl in enumerate(txt_lens):
            attn[r, :tl + nbb] = 1
        return {"input_ids": input_ids,
                "position_ids": torch.arange(max_tl, dtype=torch.long).unsqueeze(0),
                "img_feat": feat.unsqueeze(0), "img_pos_feat": pos.unsqueeze(0),
                "attn_masks": attn,
                "gather_index": get_gather_index(txt_lens, [nbb] * n, n, max_tl, attn.size(1))}


def itm_rank_hn_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Hard-negative items are whole batches: DataLoader ``batch_size`` must be 1."""
    if len(inputs) != 1:
        raise ValueError(f"itm_rank_hn_collate: items are whole batches; use batch_size=1 "
                         f"(got {len(inputs)})")
    return inputs[0]


class ItmValDataset(_ItmBase):
    """A caption against its image and the following ``mini_batch_size - 1`` images of
    ``all_img_ids`` (the original's fixed validation negatives)."""
    task = "itm-val"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, mini_batch_size: int = 400,
                 **kw):
        super().__init__(txt_db, img_db, **kw)
        del self.lens
        self.txt2img = txt_db.txt2img
        self.img2txts = _img2txts(txt_db)
        self.all_img_ids = list(self.img2txts)
        if not isinstance(mini_batch_size, int) or not 0 < mini_batch_size <= len(self.all_img_ids):
            raise ValueError(f"mini_batch_size must be an int in [1, {len(self.all_img_ids)}] "
                             f"(the number of images), got {mini_batch_size!r}")
        self.bs = mini_batch_size
        self._img_pos = {img: j for j, img in enumerate(self.all_img_ids)}

    def _get_batch_ids(self, i: int):
        gt_img = _image_of(self.txt2img, self.ids[i], self.txt_db)
        try:
            j = self._img_pos[gt_img]
        except KeyError:
            raise DbError(f"text db {self.txt_db.db_dir}: image {gt_img!r} of caption "
                          f"{self.ids[i]!r} is not in img2txts.json") from None
        n = len(self.all_img_ids)
        neg = [self.all_img_ids[(j + 1 + k) % n] for k in range(self.bs - 1)]
        return gt_img, neg

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        gt_img, neg = self._get_batch_ids(i)
        return self.get_batch(i, [gt_img] + neg)

    def get_batch(self, i: int, img_ids: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Caption ``i`` against ``img_ids`` (``input_ids`` repeated per row, as the original)."""
        input_ids = _input_ids(self.txt_db, self.ids[i])
        feats, poss = zip(*(self._img(f) for f in img_ids))
        batch = _one_text_batch(input_ids, list(feats), list(poss))
        batch["input_ids"] = batch["input_ids"].expand(len(img_ids), -1).clone()
        return batch


def itm_val_collate(inputs: List[Any]) -> Any:
    """Evaluation items are whole batches (or lists of them): ``batch_size`` must be 1."""
    if len(inputs) != 1:
        raise ValueError(f"itm_val_collate: items are whole batches; use batch_size=1 "
                         f"(got {len(inputs)})")
    return inputs[0]


class ItmEvalDataset(ItmValDataset):
    """A caption against every image: mini-batches of ``mini_batch_size`` images over
    ``all_img_ids`` sorted by box count."""
    task = "itm-eval"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.all_img_ids = sorted(self.all_img_ids, key=self.img_db.nbb)

    def __getitem__(self, i: int) -> List[Dict[str, torch.Tensor]]:
        return [self.get_batch(i, self.all_img_ids[st:st + self.bs])
                for st in range(0, len(self.all_img_ids), self.bs)]


itm_eval_collate = itm_val_collate
