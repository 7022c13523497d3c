"""Referring-expression evaluation as the original ``train_re.py`` / ``inf_re.py``: the
highest-scoring region's box against the target box, correct when IoU > 0.5."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..data.re import compute_iou

__all__ = ["re_eval_batch", "re_accuracy", "RE_IOU_THRESHOLD", "compute_iou"]

#: a prediction is correct when its IoU with the target box is above this
RE_IOU_THRESHOLD = 0.5


def re_eval_batch(scores: torch.Tensor, batch: Dict[str, Any]) -> Tuple[int, List[Dict[str, Any]]]:
    """(number correct, predictions) of one ``re_eval_collate`` batch given the model's
    region scores [n, max_num_bb] (``compute_loss=False``).  Predictions are the original
    ``inf_re.py`` records ``{'sent_id': int, 'pred_box': [x, y, w, h], 'tgt_box': [...]}``.
    One host sync (the argmax)."""
    n = len(batch["sent_ids"])
    if scores.dim() != 2 or scores.size(0) != n:
        raise ValueError(f"scores must be [n={n}, max_num_bb], got {tuple(scores.shape)}")
    ixs = scores.argmax(dim=1).cpu().tolist()
    correct, preds = 0, []
    for ix, boxes, tgt, sent_id in zip(ixs, batch["obj_boxes"], batch["tgt_box"],
                                       batch["sent_ids"]):
        if ix >= len(boxes):
            raise ValueError(f"sentence {sent_id!r}: the best region {ix} is padding (the image "
                             f"has {len(boxes)} boxes); were obj_masks applied?")
        pred = boxes[ix]
        preds.append({"sent_id": int(sent_id), "pred_box": pred.tolist(),
                      "tgt_box": tgt.tolist()})
        correct += compute_iou(pred, tgt) > RE_IOU_THRESHOLD
    return int(correct), preds


def re_accuracy(n_correct: int, n_examples: int) -> float:
    """``valid/acc``: the fraction of expressions whose predicted box has IoU > 0.5."""
    if n_examples <= 0:
        raise ValueError("re_accuracy: no examples were evaluated")
    return n_correct / n_examples
