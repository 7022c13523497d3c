"""UNITER for VCR, drop-in for the original's ``model/vcr.py``.

``UniterForVisualCommonsenseReasoning(config, img_dim)``: one row per (question, choice)
pair, the pooled [CLS] output through ``vcr_output`` = Linear(H, 2H), ReLU, LayerNorm(2H),
Linear(2H, 2).  Build it, load a checkpoint, then call :meth:`init_type_embedding` (4 token
types: question 0, region 1, answer 2, rationale 3) and :meth:`init_word_embedding` with
:data:`VCR_NUM_SPECIAL_TOKENS` (81 person-tag tokens appended to the vocabulary), as
``train_vcr.py`` does; a fine-tuned or second-stage-pretrained VCR checkpoint loads after
them.  ``forward(batch, compute_loss=True)`` returns the mean cross-entropy over the rows
against ``targets`` [n, 1] (1 = the right choice; the loss is already reduced, as in the
original) or, with ``compute_loss=False``, the "right choice" logit per row [n, 1].

``config.vocab_size`` is not updated by :meth:`init_word_embedding` (as in the original);
the batch check tests ``input_ids`` against the embedding's real row count.
"""
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import LAYER_NORM_EPS
from .finetune_base import UniterFinetuneModel
from .layer import LayerNorm
from .model import UniterModel, check_encoder_batch

__all__ = ["UniterForVisualCommonsenseReasoning", "vcr_train_loss", "grow_type_embedding",
           "grow_word_embedding", "VCR_NUM_SPECIAL_TOKENS", "VCR_TYPE_ROWS",
           "VCR_NUM_CHOICES"]

#: person-tag tokens the VCR text dbs append to the BERT vocabulary (``train_vcr.py``)
VCR_NUM_SPECIAL_TOKENS = 81
#: source row of each of the 4 VCR token types: question (text 0), region (image 1),
#: answer and rationale (both start as the text type)
VCR_TYPE_ROWS = (0, 1, 0, 0)
#: answers per question and rationales per answer
VCR_NUM_CHOICES = 4


def vcr_train_loss(loss: torch.Tensor) -> torch.Tensor:
    """``train_vcr.py``'s reduction: ``loss.mean()`` of the model's (already mean) loss."""
    return loss.mean()


def grow_type_embedding(model: nn.Module, rows: Sequence[int] = VCR_TYPE_ROWS) -> None:
    """Replace ``model.uniter``'s token-type embedding by one with ``len(rows)`` rows, row
    ``i`` copied from old row ``rows[i]`` (the original's VCR ``init_type_embedding``).  The
    new embedding is built and initialised first, consuming the same random numbers."""
    old = model.uniter.embeddings.token_type_embeddings
    if max(rows) >= old.num_embeddings:
        raise ValueError(f"init_type_embedding: source rows {list(rows)} but the embedding has "
                         f"{old.num_embeddings} rows")
    new = nn.Embedding(len(rows), model.uniter.config.hidden_size)
    new.apply(model.init_weights)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.tensor(list(rows), device=old.weight.device)])
    new.weight.requires_grad_(old.weight.requires_grad)
    model.uniter.embeddings.token_type_embeddings = new


def grow_word_embedding(model: nn.Module, num_special_tokens: int) -> nn.Embedding:
    """Append ``num_special_tokens`` freshly initialised rows to ``model.uniter``'s word
    embedding (the original's ``init_word_embedding``; like it, the new embedding has no
    padding row and ``config.vocab_size`` is left as it was).  Returns the new embedding."""
    if not isinstance(num_special_tokens, int) or num_special_tokens < 0:
        raise ValueError(f"num_special_tokens must be a non-negative int, got "
                         f"{num_special_tokens!r}")
    old = model.uniter.embeddings.word_embeddings
    n_old = old.num_embeddings
    new = nn.Embedding(n_old + num_special_tokens, model.uniter.config.hidden_size)
    new.apply(model.init_weights)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:n_old].copy_(old.weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    model.uniter.embeddings.word_embeddings = new
    return new


class UniterForVisualCommonsenseReasoning(UniterFinetuneModel):
    """Fine-tune UNITER for VCR (binary scoring of each question-choice pair)."""

    reduce_loss = staticmethod(vcr_train_loss)
    uses_txt_type_ids = True

    def __init__(self, config, img_dim: int):
        super().__init__(config)
        h = config.hidden_size
        self.uniter = UniterModel(config, img_dim)
        self.vcr_output = nn.Sequential(nn.Linear(h, h * 2), nn.ReLU(),
                                        LayerNorm(h * 2, eps=LAYER_NORM_EPS), nn.Linear(h * 2, 2))
        self.apply(self.init_weights)

    def init_type_embedding(self) -> None:
        grow_type_embedding(self, VCR_TYPE_ROWS)

    def init_word_embedding(self, num_special_tokens: int) -> None:
        grow_word_embedding(self, num_special_tokens)

    def check_batch(self, batch: Dict[str, Any], compute_loss: bool = True) -> None:
        name = type(self).__name__
        check_encoder_batch(self.uniter, batch, ["targets"] if compute_loss else [],
                            what=f"{name} batch")
        if compute_loss:
            t, n = batch["targets"], batch["input_ids"].size(0)
            if t.dtype.is_floating_point or t.numel() != n:
                raise ValueError(f"{name}: targets must be an integer tensor with one 0/1 "
                                 f"entry per row ({n}), got {t.dtype} {tuple(t.shape)}")
            if n and bool((t.min() < 0) | (t.max() > 1)):
                raise ValueError(f"{name}: targets must be 0 or 1 (1 = the right choice)")

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        rank_scores = self.vcr_output(self._pooled(batch, compute_loss))
        if compute_loss:
            return F.cross_entropy(rank_scores.float(), batch["targets"].reshape(-1),
                                   reduction="mean")
        return rank_scores[:, 1:]
