"""UNITER for NLVR2, drop-in for the original's ``model/nlvr2.py``.

Three variants, each ``(config, img_dim)`` with ``init_type_embedding()``
(call it after loading a pretraining checkpoint, before loading a fine-tuned
NLVR2 one: it grows the token types to 3 rows, text / left image / right image):

* :class:`UniterForNlvr2Paired` — batch rows come in pairs (text + left image,
  text + right image; ``nlvr2_paired_collate``); the two pooled [CLS] outputs are
  concatenated into ``nlvr2_output`` = Linear(2H, 2).  ``targets`` has one entry
  per pair.
* :class:`UniterForNlvr2Triplet` — one row per example, text + both images
  (``nlvr2_triplet_collate``); ``nlvr2_output`` = Linear(H, 2) on the pooled output.
* :class:`UniterForNlvr2PairedAttn` — paired rows, then bidirectional cross
  attention between the two sequences (``attn1``: left→right, ``attn2``:
  right→left), ``fc`` = Linear(2H, H) + ReLU + Dropout on [attended; own],
  ``attn_pool`` over each side and ``nlvr2_output`` = Linear(2H, 2).

``forward(batch, compute_loss=True)`` returns the per-example cross-entropy
[n] (``reduction='none'``) or the logits [n, 2]; the original ``train_nlvr2.py``
reduces with ``loss.mean()`` (:func:`nlvr2_train_loss`).  Class 1 means "True".
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionPool, MultiheadAttention
from .finetune_base import UniterFinetuneModel, check_class_targets, init_type_embedding
from .model import UniterModel

__all__ = ["UniterForNlvr2Paired", "UniterForNlvr2Triplet", "UniterForNlvr2PairedAttn",
           "AttentionPool", "nlvr2_train_loss", "NLVR2_NUM_LABELS"]

#: False, True
NLVR2_NUM_LABELS = 2


def nlvr2_train_loss(loss: torch.Tensor) -> torch.Tensor:
    """UNITER's training reduction of the NLVR2 loss: the mean over examples."""
    if loss.dim() != 1:
        raise ValueError(f"expected the per-example loss [n], got {tuple(loss.shape)}")
    return loss.mean()


class _Nlvr2Base(UniterFinetuneModel):
    uses_img_type_ids = True
    #: rows of the encoder batch per example (2 for the paired layouts)
    rows_per_example = 1

    reduce_loss = staticmethod(nlvr2_train_loss)

    def init_type_embedding(self) -> None:
        """Token types text / image 1 / image 2: rows 0, 1 kept, row 2 copies row 1."""
        init_type_embedding(self, 3)

    def _check_layout(self, batch: Dict[str, Any]) -> None:
        b = batch["input_ids"].size(0)
        if b % self.rows_per_example:
            raise ValueError(f"{type(self).__name__}: the batch has {b} rows; the paired layout "
                             "needs an even number (text + left image, text + right image)")

    def _check_targets(self, batch: Dict[str, Any]) -> None:
        check_class_targets(type(self).__name__, batch["targets"],
                            batch["input_ids"].size(0) // self.rows_per_example,
                            NLVR2_NUM_LABELS)

    def _output(self, answer_scores: torch.Tensor, batch: Dict[str, Any], compute_loss: bool):
        if compute_loss:
            return F.cross_entropy(answer_scores.float(), batch["targets"], reduction="none")
        return answer_scores


class UniterForNlvr2Paired(_Nlvr2Base):
    """Fine-tune UNITER for NLVR2 (paired format)."""
    rows_per_example = 2

    def __init__(self, config, img_dim: int):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size * 2, NLVR2_NUM_LABELS)
        self.apply(self.init_weights)

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        pooled = self._pooled(batch, compute_loss)
        n_pair = pooled.size(0) // 2
        answer_scores = self.nlvr2_output(pooled.contiguous().view(n_pair, -1))
        return self._output(answer_scores, batch, compute_loss)


class UniterForNlvr2Triplet(_Nlvr2Base):
    """Fine-tune UNITER for NLVR2 (triplet format: text, image 1, image 2 in one sequence)."""

    def __init__(self, config, img_dim: int):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size, NLVR2_NUM_LABELS)
        self.apply(self.init_weights)

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        answer_scores = self.nlvr2_output(self._pooled(batch, compute_loss))
        return self._output(answer_scores, batch, compute_loss)


class UniterForNlvr2PairedAttn(_Nlvr2Base):
    """Fine-tune UNITER for NLVR2 (paired format with an extra cross-attention layer)."""
    rows_per_example = 2

    def __init__(self, config, img_dim: int):
        super().__init__(config)
        h = config.hidden_size
        self.uniter = UniterModel(config, img_dim)
        self.attn1 = MultiheadAttention(h, config.num_attention_heads,
                                        config.attention_probs_dropout_prob)
        self.attn2 = MultiheadAttention(h, config.num_attention_heads,
                                        config.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(),
                                nn.Dropout(config.hidden_dropout_prob))
        self.attn_pool = AttentionPool(h, config.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * h, NLVR2_NUM_LABELS)
        self.apply(self.init_weights)

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        seq = self._encode(batch, compute_loss)
        bs, tl, d = seq.shape
        # rows 2i / 2i+1 are the left / right image of example i
        left, right = seq.contiguous().view(bs // 2, tl * 2, d).chunk(2, dim=1)
        pad = batch["attn_masks"] == 0
        left_pad, right_pad = pad.contiguous().view(bs // 2, tl * 2).chunk(2, dim=1)
        left, right = left.transpose(0, 1), right.transpose(0, 1)        # [T, n, H]
        l2r, _ = self.attn1(left, right, right, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right, left, left, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left], dim=-1)).transpose(0, 1)  # [n, T, H]
        right = self.fc(torch.cat([r2l, right], dim=-1)).transpose(0, 1)
        left = self.attn_pool(left, left_pad)
        right = self.attn_pool(right, right_pad)
        answer_scores = self.nlvr2_output(torch.cat([left, right], dim=-1))
        return self._output(answer_scores, batch, compute_loss)
