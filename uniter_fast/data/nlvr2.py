"""NLVR2 datasets over UNITER's txt/img dbs, drop-in for the original's ``data/nlvr2.py``.

An NLVR2 text record (UNITER's ``prepro.py``) holds ``input_ids`` (the
statement), ``img_fname`` = the pair of image names (left, right) and
``target`` = 1 ("True") or 0 ("False"), ``None`` on an unlabelled split;
``txt2img.json`` maps each id to the pair (a list).

Two layouts, each with a training and an eval dataset:

* **paired** (``Nlvr2PairedDataset``, for ``UniterForNlvr2Paired`` /
  ``…PairedAttn``): an item is ``{"inputs": [left, right], "targets": int}``
  where each side is ``{"input_ids", "img_feat", "img_pos_feat", "attn_masks",
  "img_type_ids"}`` ([CLS] text [SEP] + that image; image type 1 left, 2 right).
  ``nlvr2_paired_collate`` flattens the pairs: batch rows 2i and 2i+1 are the
  left and right side of example i, ``targets`` [n] has one entry per example.
* **triplet** (``Nlvr2TripletDataset``, for ``UniterForNlvr2Triplet``): one
  item per example, the text followed by both images' regions (types 1 then 2).

``use_img_type=False`` leaves ``img_type_ids`` out (None), as in the original.
``lens`` for the token buckets: paired ``2·text + boxes(left) + boxes(right)``,
triplet ``text + boxes(left) + boxes(right)``.  Every id's ``txt2img`` entry is
checked to be a pair when the dataset is built; targets when an item is read.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from .collate import _common
from .datasets import DetectFeatTxtTokDataset, too_long_note
from .db import DbError, DetectFeatLmdb, TxtTokLmdb
from .task_common import read_record, stack_targets

__all__ = ["Nlvr2PairedDataset", "Nlvr2PairedEvalDataset", "Nlvr2TripletDataset",
           "Nlvr2TripletEvalDataset", "nlvr2_paired_collate", "nlvr2_paired_eval_collate",
           "nlvr2_triplet_collate", "nlvr2_triplet_eval_collate", "NLVR2_IMAGES"]

#: images per NLVR2 example
NLVR2_IMAGES = 2


class _Nlvr2Dataset(DetectFeatTxtTokDataset):
    """Shared by the NLVR2 datasets: this rank's shard of the ids, their image pairs
    (validated) and the text records' targets."""
    task = "nlvr2"
    labelled = True          # eval datasets accept records without a target
    text_copies = 1          # texts per example in the encoder batch (paired: 2)

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, use_img_type: bool = True,
                 *, rank: int = 0, world_size: int = 1, seed: int = 0):
        # not DetectFeatTxtTokDataset.__init__: it expects one image per text
        if not isinstance(txt_db, TxtTokLmdb) or not isinstance(img_db, DetectFeatLmdb):
            raise ValueError("expected a TxtTokLmdb and a DetectFeatLmdb")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.txt_db, self.img_db = txt_db, img_db
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.use_img_type = bool(use_img_type)
        all_ids = list(txt_db.id2len.keys())
        self.ids: List[str] = all_ids[rank::world_size]
        if not self.ids:
            raise ValueError(f"text db {txt_db.db_dir}: rank {rank}/{world_size} has no examples "
                             f"({len(all_ids)} in total{too_long_note(txt_db)})")
        txt2img = txt_db.txt2img
        self.img_fnames: List[List[str]] = []
        for id_ in self.ids:
            if id_ not in txt2img:
                raise DbError(f"text db {txt_db.db_dir}: txt2img.json has no images for id {id_!r}")
            pair = txt2img[id_]
            if (not isinstance(pair, list) or len(pair) != NLVR2_IMAGES
                    or not all(isinstance(f, str) for f in pair)):
                raise DbError(f"text db {txt_db.db_dir}: record {id_!r} has image(s) {pair!r}; "
                              f"NLVR2 needs a pair of {NLVR2_IMAGES} image names")
            self.img_fnames.append(pair)
        self.txt_lens = [txt_db.id2len[i] for i in self.ids]
        self.lens = [self.text_copies * tl + sum(img_db.nbb(f) for f in pair)
                     for tl, pair in zip(self.txt_lens, self.img_fnames)]
        self.epoch = 0

    def _record(self, i: int):
        """(input_ids with [CLS]/[SEP], target or None) of example ``i``."""
        ex = read_record(self.txt_db, self.ids[i], self.img_fnames[i])
        target = ex.get("target")
        where = f"text db {self.txt_db.db_dir}: record {self.ids[i]!r}"
        if target is None:
            if self.labelled:
                raise DbError(f"{where} has no 'target' (NLVR2 needs 0 or 1)")
        elif isinstance(target, bool) or not isinstance(target, int) or target not in (0, 1):
            raise DbError(f"{where}: target must be 0 (False) or 1 (True), got {target!r}")
        input_ids = torch.tensor(self.txt_db.combine_inputs(ex["input_ids"]))
        return input_ids, (None if target is None else int(target))

    def _type_ids(self, side: int, nbb: int) -> Optional[torch.Tensor]:
        return torch.full((nbb,), side + 1, dtype=torch.long) if self.use_img_type else None


class Nlvr2PairedDataset(_Nlvr2Dataset):
    """``Nlvr2PairedDataset(txt_db, img_db, use_img_type=True, *, rank=0, world_size=1,
    seed=0)``: items ``{"inputs": [left, right], "targets": 0/1}``."""
    text_copies = 2

    def __getitem__(self, i: int) -> Dict[str, Any]:
        input_ids, target = self._record(i)
        sides = []
        for side, fname in enumerate(self.img_fnames[i]):
            feat, pos = self._img(fname)
            sides.append({"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                          "attn_masks": torch.ones(len(input_ids) + feat.size(0),
                                                   dtype=torch.long),
                          "img_type_ids": self._type_ids(side, feat.size(0))})
        return {"inputs": sides, "targets": target}


class Nlvr2PairedEvalDataset(Nlvr2PairedDataset):
    """As :class:`Nlvr2PairedDataset`, plus ``qid``; ``targets`` None for unlabelled records."""
    labelled = False

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = super().__getitem__(i)
        item["qid"] = self.ids[i]
        return item


class Nlvr2TripletDataset(_Nlvr2Dataset):
    """``Nlvr2TripletDataset(txt_db, img_db, use_img_type=True, *, rank=0, world_size=1,
    seed=0)``: items ``{"input_ids", "img_feat", "img_pos_feat", "attn_masks",
    "img_type_ids", "targets"}`` with both images' regions, left then right."""

    def __getitem__(self, i: int) -> Dict[str, Any]:
        input_ids, target = self._record(i)
        feats, poss, types = [], [], []
        for side, fname in enumerate(self.img_fnames[i]):
            feat, pos = self._img(fname)
            feats.append(feat)
            poss.append(pos)
            types.append(self._type_ids(side, feat.size(0)))
        feat = torch.cat(feats, dim=0)
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": torch.cat(poss, dim=0),
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "img_type_ids": torch.cat(types) if self.use_img_type else None,
                "targets": target}


class Nlvr2TripletEvalDataset(Nlvr2TripletDataset):
    """As :class:`Nlvr2TripletDataset`, plus ``qid``; ``targets`` None for unlabelled records."""
    labelled = False

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = super().__getitem__(i)
        item["qid"] = self.ids[i]
        return item


def _typed_batch(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    batch, _, _ = _common(rows)
    types = [r["img_type_ids"] for r in rows]
    if all(t is None for t in types):
        batch["img_type_ids"] = None
    elif any(t is None for t in types):
        raise ValueError("cannot collate examples with and without img_type_ids")
    else:
        batch["img_type_ids"] = pad_sequence(types, batch_first=True, padding_value=0)
    return batch


def _labelled(batch: Dict[str, Any], name: str) -> Dict[str, Any]:
    if batch["targets"] is None:
        raise ValueError(f"{name}: training examples need targets (use the eval collate)")
    return batch


def nlvr2_paired_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """UNITER's paired NLVR2 batch: the encoder keys over 2n rows (left, right, left, ...),
    ``img_type_ids`` [2n, N] (or None), ``targets`` long [n]."""
    return _labelled(_paired(inputs), "nlvr2_paired_collate")


def _paired(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not inputs:
        raise ValueError("cannot collate an empty batch")
    batch = _typed_batch([side for x in inputs for side in x["inputs"]])
    batch["targets"] = stack_targets(inputs)
    return batch


def nlvr2_paired_eval_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """:func:`nlvr2_paired_collate` plus ``qids``; ``targets`` None for unlabelled examples."""
    batch = _paired(inputs)
    batch["qids"] = [x["qid"] for x in inputs]
    return batch


def _triplet(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not inputs:
        raise ValueError("cannot collate an empty batch")
    batch = _typed_batch(inputs)
    batch["targets"] = stack_targets(inputs)
    return batch


def nlvr2_triplet_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """UNITER's triplet NLVR2 batch: the encoder keys, ``img_type_ids`` [B, N] (or None),
    ``targets`` long [B]."""
    return _labelled(_triplet(inputs), "nlvr2_triplet_collate")


def nlvr2_triplet_eval_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """:func:`nlvr2_triplet_collate` plus ``qids``; ``targets`` None for unlabelled examples."""
    batch = _triplet(inputs)
    batch["qids"] = [x["qid"] for x in inputs]
    return batch
