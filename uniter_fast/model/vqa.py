"""UNITER for VQA, drop-in for the original's ``model/vqa.py``.

``UniterForVisualQuestionAnswering(config, img_dim, num_answer)``: the pooled
[CLS] output through ``vqa_output`` = Linear(H, 2H), GELU, LayerNorm(2H),
Linear(2H, num_answer).  ``forward(batch, compute_loss=True)`` returns the
per-element binary cross-entropy [B, num_answer] (``reduction='none'``, against
``batch["targets"]``, the soft VQA scores) or, with ``compute_loss=False``, the
answer logits [B, num_answer].  The original training script reduces the loss
with :func:`vqa_train_loss` (``loss.mean() * num_answer``: summed over answers,
averaged over questions).
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import LAYER_NORM_EPS
from .finetune_base import UniterFinetuneModel, check_soft_targets
from .layer import GELU, LayerNorm
from .model import UniterModel

__all__ = ["UniterForVisualQuestionAnswering", "vqa_train_loss"]


def vqa_train_loss(loss: torch.Tensor) -> torch.Tensor:
    """UNITER's training reduction of the VQA/VE loss: ``loss.mean() * loss.size(1)``
    ("instance-level BCE": the sum over answers, averaged over the batch)."""
    if loss.dim() != 2:
        raise ValueError(f"expected the per-element loss [B, num_answer], got {tuple(loss.shape)}")
    return loss.mean() * loss.size(1)


class UniterForVisualQuestionAnswering(UniterFinetuneModel):
    """Fine-tune UNITER for VQA (soft-score multi-label answer classification)."""

    def __init__(self, config, img_dim: int, num_answer: int):
        super().__init__(config)
        if not isinstance(num_answer, int) or num_answer < 1:
            raise ValueError(f"num_answer must be a positive int, got {num_answer!r}")
        self.num_answer = num_answer
        self.uniter = UniterModel(config, img_dim)
        h = config.hidden_size
        self.vqa_output = nn.Sequential(nn.Linear(h, h * 2), GELU(), LayerNorm(h * 2, eps=LAYER_NORM_EPS),
                                        nn.Linear(h * 2, num_answer))
        self.apply(self.init_weights)

    reduce_loss = staticmethod(vqa_train_loss)

    def _check_targets(self, batch: Dict[str, Any]) -> None:
        check_soft_targets(type(self).__name__, batch["targets"],
                           (batch["input_ids"].size(0), self.num_answer))

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        answer_scores = self.vqa_output(self._pooled(batch, compute_loss))
        if compute_loss:
            return F.binary_cross_entropy_with_logits(
                answer_scores.float(), batch["targets"].float(), reduction="none")
        return answer_scores
