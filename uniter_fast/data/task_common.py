"""Helpers shared by the fine-tuning datasets (VQA, VE, NLVR2)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .db import DbError, TxtTokLmdb

__all__ = ["read_record", "stack_targets"]


def read_record(txt_db: TxtTokLmdb, id_: str, img_fname: Any) -> Dict[str, Any]:
    """``txt_db[id_]``, checked to name ``img_fname`` (as ``txt2img.json`` does) and to
    have a non-empty text; :class:`DbError` naming the db and key otherwise."""
    ex = txt_db[id_]
    fn = ex["img_fname"]
    if (list(fn) if isinstance(fn, (list, tuple)) else fn) != img_fname:
        raise DbError(f"text db {txt_db.db_dir}: record {id_!r} names image(s) {fn!r} but "
                      f"txt2img.json says {img_fname!r}")
    if len(ex["input_ids"]) == 0:
        raise DbError(f"text db {txt_db.db_dir}: record {id_!r} is empty")
    return ex


def stack_targets(inputs: List[Dict[str, Any]]) -> Optional[torch.Tensor]:
    """Stack the examples' ``targets`` (tensors, or ints for class labels); None when no
    example has one; a batch mixing both raises ``ValueError``."""
    targets = [x["targets"] for x in inputs]
    if all(t is None for t in targets):
        return None
    if any(t is None for t in targets):
        raise ValueError("cannot collate a batch where some examples have targets and others "
                         "do not (mixed labelled and unlabelled records)")
    if torch.is_tensor(targets[0]):
        return torch.stack(targets, dim=0)
    return torch.tensor(targets, dtype=torch.long)
