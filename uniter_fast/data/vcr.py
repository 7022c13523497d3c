"""VCR datasets, drop-in for the original's ``data/vcr.py``.

A VCR text db (UNITER's ``vcr_{split}.db``) is an LMDB of one record per question
(``input_ids`` the question, ``input_ids_as`` its 4 answers, ``input_ids_rs`` its 4
rationales, ``qa_target`` / ``qar_target`` the right ones, -1 on the test split,
``img_fname`` = [ground-truth-box image, detected-box image]) with ``id2len_qa.json`` and
``id2len_qar.json`` (lengths for filtering and token buckets), ``txt2img.json`` (id -> the
two image names) and ``meta.json``.  Person tags are token ids past BERT's vocabulary
(:data:`~uniter_fast.model.vcr.VCR_NUM_SPECIAL_TOKENS` of them): the model must have
called ``init_word_embedding`` first.  Image dbs: ``vcr_gt_{split}`` (ground-truth boxes,
read with ``conf_th=-1, num_bb=100``: records keep all their boxes) and ``vcr_{split}``
(detected boxes); either or both (their regions concatenated, gt first).

* :class:`VcrTxtTokLmdb` ``(db_dir, max_txt_len=120, task="qa,qar")``.
* :class:`VcrDataset` (training, ``task`` "qa" or "qar"): per question 4 rows, one per
  answer (Q->A) or per rationale (QA->R, the question followed by the right answer),
  ``targets`` 1 on the right one.  Token types: 0 question, 2 answer, 3 rationale (the
  regions are type 1).
* :class:`VcrEvalDataset` ``(split, txt_db, ...)`` (``task`` "qa,qar"): the 4 Q->A rows,
  then on ``split='val'`` the 4 QA->R rows of the right answer (8 rows) or on ``'test'``
  the 16 QA->R rows of every answer (20 rows), with ``qids``, ``qa_targets`` and
  ``qar_targets``.

Questions are sharded ``ids[rank::world_size]``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from .collate import _common
from .datasets import img_pos_feat, too_long_note
from .db import DbError, DetectFeatLmdb, TxtTokLmdb, _atomic_json, check_token_ids, write_txt_db

__all__ = ["VcrTxtTokLmdb", "VcrDetectFeatTxtTokDataset", "VcrDataset", "VcrEvalDataset",
           "vcr_collate", "vcr_eval_collate", "write_vcr_txt_db", "VCR_TASKS",
           "VCR_EVAL_SPLITS", "QUESTION_TYPE", "ANSWER_TYPE", "RATIONALE_TYPE"]

VCR_TASKS = ("qa", "qar", "qa,qar")
VCR_EVAL_SPLITS = ("val", "test")
#: token types of VCR text (the regions are type 1)
QUESTION_TYPE, ANSWER_TYPE, RATIONALE_TYPE = 0, 2, 3
#: answers / rationales per question
_N_CHOICES = 4


def _id2len_name(task: str) -> str:
    return f"id2len_{'qar' if task == 'qa,qar' else task}.json"


class VcrTxtTokLmdb(TxtTokLmdb):
    """VCR text db; ``id2len`` from ``id2len_{qa|qar}.json`` (``qar`` for "qa,qar")."""

    def __init__(self, db_dir: str, max_txt_len: int = 120, task: str = "qa,qar"):
        if task not in VCR_TASKS:
            raise ValueError(f"VCR supports the tasks 'qa', 'qar' or 'qa,qar', got {task!r}")
        self.task = task
        self.id2len_file = _id2len_name(task)
        super().__init__(db_dir, max_txt_len)

    def __getitem__(self, id_: str) -> Dict[str, Any]:
        dump = self._load(id_)
        where = f"VCR text db {self.db_dir}: record {id_!r}"
        if not isinstance(dump, dict):
            raise DbError(f"{where} is not a dict")
        missing = [k for k in ("input_ids", "input_ids_as", "input_ids_rs", "qa_target",
                               "qar_target", "img_fname") if k not in dump]
        if missing:
            raise DbError(f"{where} lacks {missing}")

        # the question, then each answer / rationale: lists of non-negative ints (not bools)
        check_token_ids(dump["input_ids"], where, "input_ids (the question)", nonempty=True)
        for key in ("input_ids_as", "input_ids_rs"):
            ch = dump[key]
            if not isinstance(ch, (list, tuple)) or len(ch) != _N_CHOICES:
                raise DbError(f"{where}: {key} must be {_N_CHOICES} lists of token ids")
            for j, ids in enumerate(ch):
                check_token_ids(ids, where, f"{key}[{j}]")
        for key in ("qa_target", "qar_target"):
            t = dump[key]
            if not isinstance(t, int) or isinstance(t, bool) or not -1 <= t < _N_CHOICES:
                raise DbError(f"{where}: {key} must be an int in [-1, {_N_CHOICES}), got {t!r}")
        fn = dump["img_fname"]
        if not isinstance(fn, (list, tuple)) or len(fn) != 2 or not all(isinstance(f, str) for f in fn):
            raise DbError(f"{where}: img_fname must be [gt image, detected image], got {fn!r}")
        return dump


class VcrDetectFeatTxtTokDataset(Dataset):
    """Base of the VCR datasets: this rank's question ids, ``lens`` and the image reads."""

    def __init__(self, txt_db: VcrTxtTokLmdb, img_db_gt: Optional[DetectFeatLmdb] = None,
                 img_db: Optional[DetectFeatLmdb] = None, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if img_db_gt is None and img_db is None:
            raise ValueError("img_db_gt and img_db cannot both be None")
        if not isinstance(txt_db, VcrTxtTokLmdb):
            raise ValueError(f"expected a VcrTxtTokLmdb, got {type(txt_db).__name__}")
        for name, db in (("img_db_gt", img_db_gt), ("img_db", img_db)):
            if db is not None and not isinstance(db, DetectFeatLmdb):
                raise ValueError(f"{name} must be a DetectFeatLmdb, got {type(db).__name__}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.txt_db, self.img_db, self.img_db_gt = txt_db, img_db, img_db_gt
        self.task = txt_db.task
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, int(seed), 0
        all_ids = list(txt_db.id2len)
        self.ids = all_ids[rank::world_size]
        if not self.ids:
            raise ValueError(f"VCR text db {txt_db.db_dir}: rank {rank}/{world_size} has no "
                             f"examples ({len(all_ids)} in total{too_long_note(txt_db)})")
        txt2img = txt_db.txt2img
        self.img_fnames = []
        for id_ in self.ids:
            fn = txt2img.get(id_)
            if not isinstance(fn, (list, tuple)) or len(fn) != 2:
                raise DbError(f"VCR text db {txt_db.db_dir}: txt2img.json must map {id_!r} to "
                              f"[gt image, detected image], got {fn!r}")
            self.img_fnames.append(list(fn))
        self.lens = [txt_db.id2len[id_] + self._nbb(fn) for id_, fn in zip(self.ids, self.img_fnames)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def _nbb(self, fnames: List[str]) -> int:
        n = 0
        if self.img_db_gt is not None:
            n += self.img_db_gt.nbb(fnames[0])
        if self.img_db is not None:
            n += self.img_db.nbb(fnames[1])
        return n

    def _get_img_feat(self, fname_gt: str, fname: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
        feats, poss = [], []
        for db, f in ((self.img_db_gt, fname_gt), (self.img_db, fname)):
            if db is not None:
                feat, bb = db[f]
                feats.append(torch.tensor(feat))
                poss.append(img_pos_feat(torch.tensor(bb)))
        feat, pos = torch.cat(feats, dim=0), torch.cat(poss, dim=0)
        return feat, pos, feat.size(0)

    def _record(self, i: int) -> Dict[str, Any]:
        ex = self.txt_db[self.ids[i]]
        if list(ex["img_fname"]) != self.img_fnames[i]:
            raise DbError(f"VCR text db {self.txt_db.db_dir}: record {self.ids[i]!r} names "
                          f"images {ex['img_fname']!r} but txt2img.json says "
                          f"{self.img_fnames[i]!r}")
        return ex

    @staticmethod
    def _row(input_ids: List[int], type_ids: List[int], feat, pos) -> Dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(input_ids), "txt_type_ids": torch.tensor(type_ids),
                "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long)}


class VcrDataset(VcrDetectFeatTxtTokDataset):
    """Training items: 4 rows (one per answer, or per rationale) with ``target`` 0/1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.task == "qa,qar":
            raise ValueError("VcrDataset trains one task at a time: build the text db with "
                             "task='qa' or task='qar'")

    def _get_input_ids(self, ex: Dict[str, Any], i: int):
        q = list(ex["input_ids"])
        types = [QUESTION_TYPE] * len(q)
        if self.task == "qar":
            a = ex["qa_target"]
            if a < 0:
                raise DbError(f"VCR text db {self.txt_db.db_dir}: record {self.ids[i]!r} has no "
                              "answer label (qa_target -1) for QA->R training")
            gt_a = [self.txt_db.sep] + list(ex["input_ids_as"][a])
            q, types = q + gt_a, types + [ANSWER_TYPE] * len(gt_a)
            return q, ex["input_ids_rs"], types
        return q, ex["input_ids_as"], types

    def __getitem__(self, i: int) -> List[Dict[str, torch.Tensor]]:
        ex = self._record(i)
        feat, pos, _ = self._get_img_feat(*self.img_fnames[i])
        q, choices, types_q = self._get_input_ids(ex, i)
        label = ex[f"{self.task}_target"]
        if label < 0:
            raise DbError(f"VCR text db {self.txt_db.db_dir}: record {self.ids[i]!r} has no "
                          f"{self.task}_target (-1: a test record)")
        choice_type = RATIONALE_TYPE if types_q[-1] == ANSWER_TYPE else ANSWER_TYPE
        db = self.txt_db
        out = []
        for k, c in enumerate(choices):
            ids = [db.cls_] + q + [db.sep] + list(c) + [db.sep]
            types = [QUESTION_TYPE] + types_q + [choice_type] * (len(c) + 2)
            row = self._row(ids, types, feat, pos)
            row["target"] = torch.tensor([int(k == label)], dtype=torch.long)
            out.append(row)
        return out


def vcr_collate(inputs: List[List[Dict[str, torch.Tensor]]]) -> Dict[str, Any]:
    """The original's VCR training batch: every question's 4 rows in order, plus
    ``txt_type_ids`` (0-padded) and ``targets`` [4n, 1]."""
    rows = [r for item in inputs for r in item]
    batch, _, _ = _common(rows)
    batch["txt_type_ids"] = pad_sequence([r["txt_type_ids"] for r in rows], batch_first=True,
                                         padding_value=0)
    batch["targets"] = torch.stack([r["target"] for r in rows], dim=0)
    return batch


class VcrEvalDataset(VcrDetectFeatTxtTokDataset):
    """Evaluation items: (rows, qid, qa_target [1], qar_target [1]); ``split`` 'val' (8 rows)
    or 'test' (20 rows)."""

    def __init__(self, split: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if split not in VCR_EVAL_SPLITS:
            raise ValueError(f"split must be one of {VCR_EVAL_SPLITS}, got {split!r}")
        if self.task != "qa,qar":
            raise ValueError("VcrEvalDataset evaluates both tasks: build the text db with "
                             "task='qa,qar'")
        self.split = split

    def _get_input_ids(self, ex: Dict[str, Any], i: int):
        db = self.txt_db
        q = list(ex["input_ids"])
        tq = [QUESTION_TYPE] * len(q)
        if self.split == "val" and ex["qa_target"] < 0:
            raise DbError(f"VCR text db {db.db_dir}: record {self.ids[i]!r} has no qa_target "
                          "(-1) but split='val' needs it (use split='test')")
        rows, types = [], []
        for a in ex["input_ids_as"]:
            rows.append([db.cls_] + q + [db.sep] + list(a) + [db.sep])
            types.append([QUESTION_TYPE] + tq + [ANSWER_TYPE] * (len(a) + 2))
        for k, a in enumerate(ex["input_ids_as"]):
            if self.split == "test" or k == ex["qa_target"]:
                qa = [db.cls_] + q + [db.sep] + list(a) + [db.sep]
                tqa = [QUESTION_TYPE] + tq + [ANSWER_TYPE] * (len(a) + 1)
                for r in ex["input_ids_rs"]:
                    rows.append(qa + list(r) + [db.sep])
                    types.append(tqa + [RATIONALE_TYPE] * (len(r) + 2))
        return rows, types

    def __getitem__(self, i: int):
        ex = self._record(i)
        feat, pos, _ = self._get_img_feat(*self.img_fnames[i])
        rows, types = self._get_input_ids(ex, i)
        outs = [self._row(r, t, feat, pos) for r, t in zip(rows, types)]
        return (outs, self.ids[i], torch.tensor([int(ex["qa_target"])]),
                torch.tensor([int(ex["qar_target"])]))


def vcr_eval_collate(inputs: List[tuple]) -> Dict[str, Any]:
    """The original's VCR evaluation batch: every question's rows in order, ``qids`` (list),
    ``qa_targets`` and ``qar_targets`` [n, 1]."""
    rows = [r for outs, _, _, _ in inputs for r in outs]
    if len({len(outs) for outs, _, _, _ in inputs}) != 1:
        raise ValueError("vcr_eval_collate: questions with different numbers of rows (mixing "
                         "the val and test layouts)")
    batch, _, _ = _common(rows)
    batch["txt_type_ids"] = pad_sequence([r["txt_type_ids"] for r in rows], batch_first=True,
                                         padding_value=0)
    batch["qids"] = [qid for _, qid, _, _ in inputs]
    batch["qa_targets"] = torch.stack([t for _, _, t, _ in inputs], dim=0)
    batch["qar_targets"] = torch.stack([t for _, _, _, t in inputs], dim=0)
    return batch


def write_vcr_txt_db(db_dir: str, examples: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
                     id2len_qa: Optional[Dict[str, int]] = None,
                     id2len_qar: Optional[Dict[str, int]] = None) -> None:
    """Write a VCR text db in UNITER's layout (records as described above, ``img_fname`` =
    [gt image, detected image]).  ``id2len_qa`` / ``id2len_qar`` default to the question's
    length plus the longest answer (and rationale)."""
    write_txt_db(db_dir, examples, meta)
    if id2len_qa is None:
        id2len_qa = {k: len(v["input_ids"]) + max(map(len, v["input_ids_as"]))
                     for k, v in examples.items()}
    if id2len_qar is None:
        id2len_qar = {k: id2len_qa[k] + max(map(len, v["input_ids_rs"]))
                      for k, v in examples.items()}
    _atomic_json(os.path.join(db_dir, _id2len_name("qa")), id2len_qa)
    _atomic_json(os.path.join(db_dir, _id2len_name("qar")), id2len_qar)
