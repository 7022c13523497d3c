"""Pretraining datasets (MLM, MRFR, MRC, ITM) over UNITER's txt/img dbs.

Like UNITER's ``DetectFeatTxtTokDataset`` family, each dataset holds this rank's
shard of the text ids (``ids[rank::world_size]``, so N ranks see disjoint data)
and ``lens`` (text length + box count) for the token-bucket sampler.

Randomness is explicit and reproducible: example ``i`` of epoch ``e`` is masked
with ``random.Random`` seeded from ``(seed, task, e, text id)``, so the same
seed gives the same masks on any number of DataLoader workers and after a
resume; ITM draws its labels and negative images per epoch from
``(seed, e, rank)``.
"""
from __future__ import annotations

import random
import zlib
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..masking import MASKING_MODES, img_mask_target, random_word, region_mask
from .db import DbError, DetectFeatLmdb, TxtTokLmdb

__all__ = ["DetectFeatTxtTokDataset", "MlmDataset", "MrfrDataset", "MrcDataset", "ItmDataset",
           "example_rng", "img_pos_feat"]


def example_rng(seed: int, tag: str, epoch: int, key: str) -> random.Random:
    """A ``random.Random`` determined by (seed, tag, epoch, key) only."""
    h = zlib.crc32(f"{seed}\x00{tag}\x00{epoch}\x00{key}".encode("utf-8"))
    return random.Random((int(seed) << 32) ^ h)


def img_pos_feat(norm_bb: torch.Tensor) -> torch.Tensor:
    """UNITER's 7-d position feature: [x1, y1, x2, y2, w, h, w*h]."""
    return torch.cat([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], dim=-1)


def too_long_note(txt_db) -> str:
    """", N longer than max_txt_len M were dropped" when the length limit dropped texts."""
    n = getattr(txt_db, "n_too_long", 0)
    return (f"; {n} texts longer than max_txt_len {txt_db.max_txt_len} were dropped"
            if n else "")


class DetectFeatTxtTokDataset(Dataset):
    task = "base"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not isinstance(txt_db, TxtTokLmdb) or not isinstance(img_db, DetectFeatLmdb):
            raise ValueError("expected a TxtTokLmdb and a DetectFeatLmdb")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.txt_db, self.img_db = txt_db, img_db
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        all_ids = list(txt_db.id2len.keys())
        self.ids: List[str] = all_ids[rank::world_size]
        if not self.ids:
            raise ValueError(f"text db {txt_db.db_dir}: rank {rank}/{world_size} has no examples "
                             f"({len(all_ids)} in total{too_long_note(txt_db)})")
        txt2img = txt_db.txt2img
        try:
            self.img_fnames = [txt2img[i] for i in self.ids]
        except KeyError as e:
            raise DbError(f"text db {txt_db.db_dir}: txt2img.json has no image for id {e}") from None
        self.txt_lens = [txt_db.id2len[i] for i in self.ids]
        self.lens = [tl + img_db.nbb(f) for tl, f in zip(self.txt_lens, self.img_fnames)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def _rng(self, i: int) -> random.Random:
        return example_rng(self.seed, self.task, self.epoch, self.ids[i])

    def _text(self, i: int) -> List[int]:
        ex = self.txt_db[self.ids[i]]
        if ex["img_fname"] != self.img_fnames[i]:
            raise DbError(f"text db {self.txt_db.db_dir}: record {self.ids[i]!r} names image "
                          f"{ex['img_fname']!r} but txt2img.json says {self.img_fnames[i]!r}")
        if len(ex["input_ids"]) == 0:
            raise DbError(f"text db {self.txt_db.db_dir}: record {self.ids[i]!r} is empty")
        return list(ex["input_ids"])

    def _img(self, fname: str, soft_labels: bool = False):
        d = self.img_db.get_dump(fname, with_soft_labels=soft_labels)
        feat = torch.tensor(d["features"])
        pos = img_pos_feat(torch.tensor(d["norm_bb"]))
        if soft_labels:
            return feat, pos, torch.tensor(d["soft_labels"])
        return feat, pos


def _check_masking(masking: str, other_prob: float) -> None:
    if masking not in MASKING_MODES:
        raise ValueError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
    if not 0.0 <= other_prob <= 1.0:
        raise ValueError(f"joint masking probability must be in [0, 1], got {other_prob}")


class MlmDataset(DetectFeatTxtTokDataset):
    """Masked language modelling: text masked, image intact (``masking="joint"``:
    regions also masked w.p. ``other_prob``, their features zeroed)."""
    task = "mlm"

    def __init__(self, txt_db, img_db, *, mask_prob: float = 0.15,
                 masking: str = "conditional", other_prob: float = 0.15, **kw):
        super().__init__(txt_db, img_db, **kw)
        _check_masking(masking, other_prob)
        self.mask_prob = mask_prob
        self.masking, self.other_prob = masking, float(other_prob)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        db = self.txt_db
        ids, labels = random_word(self._text(i), db.v_range, db.mask, self._rng(i), self.mask_prob)
        feat, pos = self._img(self.img_fnames[i])
        if self.masking == "joint":
            rng = example_rng(self.seed, "mlm-joint", self.epoch, self.ids[i])
            drop = region_mask(feat.size(0), self.other_prob, rng, at_least_one=False)
            feat = feat.masked_fill(drop.unsqueeze(-1), 0)
        input_ids = torch.tensor([db.cls_] + ids + [db.sep])
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "txt_labels": torch.tensor([-1] + labels + [-1])}


class _MrmDataset(DetectFeatTxtTokDataset):
    with_soft_labels = False

    def __init__(self, txt_db, img_db, *, mask_prob: float = 0.15,
                 masking: str = "conditional", other_prob: float = 0.15, **kw):
        super().__init__(txt_db, img_db, **kw)
        _check_masking(masking, other_prob)
        self.mask_prob = mask_prob
        self.masking, self.other_prob = masking, float(other_prob)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        text = self._text(i)
        if self.masking == "joint":   # tokens masked too (labels unused: the loss is MRM's)
            db = self.txt_db
            rng = example_rng(self.seed, f"{self.task}-joint", self.epoch, self.ids[i])
            text, _ = random_word(text, db.v_range, db.mask, rng, self.other_prob,
                                  at_least_one=False)
        input_ids = torch.tensor(self.txt_db.combine_inputs(text))
        out = self._img(self.img_fnames[i], soft_labels=self.with_soft_labels)
        feat, pos = out[0], out[1]
        img_mask = region_mask(feat.size(0), self.mask_prob, self._rng(i))
        item = {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "img_mask": img_mask, "img_mask_tgt": img_mask_target(img_mask, len(input_ids))}
        if self.with_soft_labels:
            item["img_soft_label"] = out[2]
        return item


class MrfrDataset(_MrmDataset):
    """Masked region feature regression: regions masked, text intact."""
    task = "mrfr"


class MrcDataset(_MrmDataset):
    """Masked region classification (also MRC-KL): regions masked, text intact."""
    task = "mrc"
    with_soft_labels = True


class ItmDataset(DetectFeatTxtTokDataset):
    """Image-text matching: with probability ``neg_prob`` the image is swapped for
    another image of this rank's shard (UNITER's ``sample_negative``).  Labels
    and negatives are redrawn each epoch; ``lens`` follows the drawn images."""
    task = "itm"

    def __init__(self, txt_db, img_db, *, neg_prob: float = 0.5, **kw):
        super().__init__(txt_db, img_db, **kw)
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"itm_neg_prob must be in [0, 1], got {neg_prob}")
        self.neg_prob = float(neg_prob)
        self.all_imgs = sorted(set(self.img_fnames))
        if neg_prob > 0 and len(self.all_imgs) < 2:
            raise ValueError("ITM negatives need at least 2 images in each rank's shard")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0x17])
        self.labels = (rng.random(len(self.ids)) >= self.neg_prob).astype(np.int64)
        self.train_imgs: List[str] = []
        n = len(self.all_imgs)
        for i, gt in enumerate(self.img_fnames):
            img = gt
            if self.labels[i] == 0:
                while img == gt:
                    img = self.all_imgs[int(rng.integers(n))]
            self.train_imgs.append(img)
        self.lens = [tl + self.img_db.nbb(f) for tl, f in zip(self.txt_lens, self.train_imgs)]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        input_ids = torch.tensor(self.txt_db.combine_inputs(self._text(i)))
        feat, pos = self._img(self.train_imgs[i])
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "target": torch.tensor([int(self.labels[i])], dtype=torch.long)}


def build_dataset(task: str, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, *, mrm_prob: float = 0.15,
                  itm_neg_prob: float = 0.5, rank: int = 0, world_size: int = 1, seed: int = 0,
                  mlm_prob: float = 0.15, masking: str = "conditional"
                  ) -> Optional[DetectFeatTxtTokDataset]:
    """Dataset for a UNITER task name (mlm, mrfr, mrc, mrc-kl / mrckl, itm).

    ``masking="joint"`` (ablation) also masks the other modality of MLM / MRM
    examples, regions at ``mrm_prob`` and tokens at ``mlm_prob``."""
    kw = dict(rank=rank, world_size=world_size, seed=seed)
    if task == "mlm":
        return MlmDataset(txt_db, img_db, mask_prob=mlm_prob, masking=masking,
                          other_prob=mrm_prob, **kw)
    if task == "mrfr":
        return MrfrDataset(txt_db, img_db, mask_prob=mrm_prob, masking=masking,
                           other_prob=mlm_prob, **kw)
    if task in ("mrc", "mrc-kl", "mrckl"):
        return MrcDataset(txt_db, img_db, mask_prob=mrm_prob, masking=masking,
                          other_prob=mlm_prob, **kw)
    if task == "itm":
        return ItmDataset(txt_db, img_db, neg_prob=itm_neg_prob, **kw)
    raise ValueError(f"unknown task {task!r}; expected mlm, mrfr, mrc, mrc-kl or itm")
