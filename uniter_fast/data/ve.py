"""Visual entailment (SNLI-VE) datasets, drop-in for the original's ``data/ve.py``.

As in UNITER, VE reuses the VQA datasets with 3 answers: a VE text record
holds the hypothesis as ``input_ids``, the premise image as ``img_fname`` and
``target = {"labels": [label], "scores": [1.0]}`` with the label from
``VE_ENT2IDX`` (contradiction 0, entailment 1, neutral 2).  Items and batches
are the VQA ones (``targets`` float [B, 3]).
"""
from ..model.ve import VE_ENT2IDX, VE_IDX2ENT, VE_NUM_LABELS
from .vqa import VqaDataset, VqaEvalDataset, vqa_collate, vqa_eval_collate

__all__ = ["VeDataset", "VeEvalDataset", "ve_collate", "ve_eval_collate", "VE_ENT2IDX",
           "VE_IDX2ENT", "VE_NUM_LABELS"]


class VeDataset(VqaDataset):
    """``VeDataset(txt_db, img_db, *, rank=0, world_size=1, seed=0)``; a label outside
    [0, 3) or a missing target raises ``DbError`` naming the db and key."""
    task = "ve"

    def __init__(self, *args, **kwargs):
        super().__init__(VE_NUM_LABELS, *args, **kwargs)


class VeEvalDataset(VqaEvalDataset):
    """As :class:`VeDataset`, plus ``qid``; ``targets`` None for unlabelled records."""
    task = "ve"

    def __init__(self, *args, **kwargs):
        super().__init__(VE_NUM_LABELS, *args, **kwargs)


ve_collate = vqa_collate
ve_eval_collate = vqa_eval_collate
