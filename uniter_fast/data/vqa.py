"""VQA datasets over UNITER's txt/img dbs, drop-in for the original's ``data/vqa.py``.

A VQA text record (UNITER's ``vqa_*.db``) holds ``input_ids`` (the question),
``img_fname`` and ``target = {"labels": [answer ids], "scores": [soft scores]}``:
the VQA soft score min(#humans who gave the answer / 3, 1) of each candidate
answer, as indices into ``ans2label.json`` (:func:`load_ans2label`; the
original's 3129 answers ship with the package).  Test-split records have no
``target``.

Items are dicts (like the pretraining datasets): ``input_ids`` ([CLS] q [SEP]),
``img_feat``, ``img_pos_feat``, ``attn_masks``, ``targets`` (float32
[num_answers], the scores scattered onto the answer ids); eval items add ``qid``
(the text id) and have ``targets`` None when the record has none.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch

from .collate import _common
from .datasets import DetectFeatTxtTokDataset
from .db import DbError
from .task_common import read_record, stack_targets

__all__ = ["ANS2LABEL_PATH", "load_ans2label", "VqaDataset", "VqaEvalDataset", "vqa_collate",
           "vqa_eval_collate", "vqa_target"]

#: the original's answer vocabulary (``utils/ans2label.json``, 3129 answers)
ANS2LABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ans2label.json")


def load_ans2label(path: Optional[str] = None) -> Dict[str, int]:
    """answer -> label id from ``path`` (default: the shipped 3129-answer file).

    The ids must be exactly 0..n-1 (the rows of the model's answer head)."""
    path = path or ANS2LABEL_PATH
    try:
        with open(path, "r", encoding="utf-8") as f:
            ans2label = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read answer vocabulary {path}: {e}") from None
    if (not isinstance(ans2label, dict)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in ans2label.values())
            or sorted(ans2label.values()) != list(range(len(ans2label)))):
        raise ValueError(f"answer vocabulary {path} must map answers to the ids 0..n-1")
    return ans2label


def vqa_target(example: Dict[str, Any], num_answers: int, where: str) -> torch.Tensor:
    """The soft-score vector [num_answers] of a record's ``target {labels, scores}``.

    Raises :class:`DbError` (naming ``where``: db and key) on a missing or malformed
    target, a label outside [0, num_answers), a repeated label or a score outside [0, 1].
    Empty ``labels`` (no candidate answer in the vocabulary) give all zeros, as in UNITER.
    """
    target = example.get("target")
    if target is None:
        raise DbError(f"{where} has no 'target' (expected {{'labels': [...], 'scores': [...]}})")
    if not isinstance(target, dict) or "labels" not in target or "scores" not in target:
        raise DbError(f"{where}: target must be a dict with 'labels' and 'scores', got {target!r}")
    labels, scores = target["labels"], target["scores"]
    if not isinstance(labels, (list, tuple)) or not isinstance(scores, (list, tuple)) \
            or len(labels) != len(scores):
        raise DbError(f"{where}: target labels and scores must be lists of one length, got "
                      f"{labels!r} and {scores!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < num_answers
               for x in labels):
        raise DbError(f"{where}: target label out of range [0, {num_answers}): {list(labels)}")
    if len(set(labels)) != len(labels):
        raise DbError(f"{where}: target labels repeat: {list(labels)}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               and 0.0 <= x <= 1.0 for x in scores):
        raise DbError(f"{where}: target scores must be numbers in [0, 1]: {list(scores)}")
    out = torch.zeros(num_answers)
    if labels:
        out[torch.tensor(labels, dtype=torch.long)] = torch.tensor(scores, dtype=torch.float32)
    return out


class VqaDataset(DetectFeatTxtTokDataset):
    """``VqaDataset(num_answers, txt_db, img_db, *, rank=0, world_size=1, seed=0)``.

    Every record must carry a valid ``target`` (else :class:`DbError` naming the db
    and key when it is read).  ``lens`` = question tokens + boxes (token buckets).
    """
    task = "vqa"

    def __init__(self, num_answers: int, txt_db, img_db, **kw):
        if not isinstance(num_answers, int) or num_answers < 1:
            raise ValueError(f"num_answers must be a positive int, got {num_answers!r}")
        super().__init__(txt_db, img_db, **kw)
        self.num_answers = num_answers

    def _where(self, i: int) -> str:
        return f"text db {self.txt_db.db_dir}: record {self.ids[i]!r}"

    def _record(self, i: int) -> Dict[str, Any]:
        """The validated text record of example ``i`` (read once)."""
        return read_record(self.txt_db, self.ids[i], self.img_fnames[i])

    def _target(self, ex: Dict[str, Any], i: int) -> Optional[torch.Tensor]:
        return vqa_target(ex, self.num_answers, self._where(i))

    def __getitem__(self, i: int) -> Dict[str, Any]:
        ex = self._record(i)
        input_ids = torch.tensor(self.txt_db.combine_inputs(ex["input_ids"]))
        feat, pos = self._img(self.img_fnames[i])
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "targets": self._target(ex, i)}


class VqaEvalDataset(VqaDataset):
    """As :class:`VqaDataset`, plus ``qid``; a record without ``target`` (test split)
    gives ``targets`` None; a record with a malformed one still raises."""

    def _target(self, ex: Dict[str, Any], i: int) -> Optional[torch.Tensor]:
        if ex.get("target") is None:
            return None
        return super()._target(ex, i)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = super().__getitem__(i)
        item["qid"] = self.ids[i]
        return item


def vqa_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """UNITER's VQA batch: ``input_ids``, ``position_ids``, ``img_feat``, ``img_pos_feat``,
    ``attn_masks``, ``gather_index``, ``targets`` (float [B, num_answers])."""
    batch, _, _ = _common(inputs)
    targets = stack_targets(inputs)
    if targets is None:
        raise ValueError("vqa_collate: training examples need targets (use vqa_eval_collate)")
    batch["targets"] = targets
    return batch


def vqa_eval_collate(inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """:func:`vqa_collate` plus ``qids`` (list of text ids); ``targets`` None when the
    examples have none."""
    batch, _, _ = _common(inputs)
    batch["qids"] = [x["qid"] for x in inputs]
    batch["targets"] = stack_targets(inputs)
    return batch
