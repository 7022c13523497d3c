"""UNITER for visual entailment, drop-in for the original's ``model/ve.py``.

``UniterForVisualEntailment(config, img_dim)`` is the VQA model with 3 answers
(``VE_ENT2IDX``: contradiction 0, entailment 1, neutral 2, as the original's
``utils/misc.py``):
same ``vqa_output`` head, same per-element BCE loss [B, 3] (``reduction='none'``)
against one-hot ``targets``, reduced in training by
:func:`~uniter_fast.model.vqa.vqa_train_loss` (``loss.mean() * 3``), as the
original's ``train_ve.py`` does.
"""
from .vqa import UniterForVisualQuestionAnswering, vqa_train_loss

__all__ = ["UniterForVisualEntailment", "VE_ENT2IDX", "VE_IDX2ENT", "VE_NUM_LABELS",
           "vqa_train_loss"]

#: SNLI-VE label -> class index (UNITER's ``utils/misc.py``)
VE_ENT2IDX = {"contradiction": 0, "entailment": 1, "neutral": 2}
VE_IDX2ENT = {i: e for e, i in VE_ENT2IDX.items()}
VE_NUM_LABELS = len(VE_ENT2IDX)


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
    """Fine-tune UNITER for VE (SNLI-VE: 3-way classification as soft BCE)."""

    def __init__(self, config, img_dim: int):
        super().__init__(config, img_dim, VE_NUM_LABELS)
