"""UNITER for image-text retrieval, drop-in for the original's ``model/itm.py``.

* :class:`UniterForImageTextRetrieval` ``(config, img_dim, margin=0.2)``: the pooled
  [CLS] output through ``rank_output`` = Linear(H, 1) (``itm_output`` = Linear(H, 2), the
  pretraining ITM head, is kept so pretraining checkpoints load; :meth:`init_output` starts
  the rank head from its "match" row).  ``forward(batch, compute_loss=True)`` returns the
  triplet loss ``clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), 0)`` per negative,
  [n_groups, sample_size - 1], for batches of ``sample_size`` rows per group, positive first
  (``itm_rank_collate``), or the raw scores [B, 1].  ``train_itm.py`` reduces with
  ``loss.mean()`` (:func:`itm_rank_train_loss`).
* :class:`UniterForImageTextRetrievalHardNeg` ``(config, img_dim, margin=0.2,
  hard_size=16)``: ``forward(batch, sample_from='t'|'i', compute_loss=True)`` on one
  positive + N sampled negatives sharing one text (``'t'``: negatives are images) or one
  image (``'i'``: negatives are texts), from ``itm_rank_hn_collate``.  In training it scores
  all 1 + N pairs without gradient (dropout off), keeps the positive and the ``hard_size``
  highest-scoring negatives and returns the triplet loss of that hard batch [1, hard_size].
  ``train_itm_hard_negatives.py`` reduces each direction with
  ``loss.mean() / train_batch_size`` (:func:`itm_hard_neg_train_loss`) and accumulates
  gradients over ``train_batch_size`` texts and images.

Differences from the original: :meth:`init_output` copies the row (the original makes
``rank_output.weight`` a view of ``itm_output.weight``'s storage, so fp32 training also
moved ``itm_output``'s row 1); the hard negatives come back ordered by score (the original
asks ``topk`` for ``sorted=False``: an unspecified order of the same rows).
"""
from typing import Any, Dict, Mapping

import torch
from torch import nn

from .finetune_base import UniterFinetuneModel
from .model import UniterModel, adapt_state_dict, check_encoder_batch

__all__ = ["UniterForImageTextRetrieval", "UniterForImageTextRetrievalHardNeg",
           "itm_rank_train_loss", "itm_hard_neg_train_loss", "select_hard_negatives",
           "has_rank_output", "SAMPLE_DIRECTIONS"]

#: ``sample_from`` of the hard-negative model: negatives are images ('t': one text) or texts
SAMPLE_DIRECTIONS = ("t", "i")


def itm_rank_train_loss(loss: torch.Tensor) -> torch.Tensor:
    """``train_itm.py``'s reduction of the triplet loss: the mean over every negative."""
    return loss.mean()


def itm_hard_neg_train_loss(loss: torch.Tensor, train_batch_size: int) -> torch.Tensor:
    """``train_itm_hard_negatives.py``'s reduction of one direction's hard-negative loss:
    ``loss.mean() / train_batch_size`` (one text or image per forward; the optimizer steps
    after ``train_batch_size`` of each, so this averages over them)."""
    if not isinstance(train_batch_size, int) or train_batch_size < 1:
        raise ValueError(f"train_batch_size must be a positive int, got {train_batch_size!r}")
    return loss.mean() / train_batch_size


def select_hard_negatives(scores: torch.Tensor, hard_size: int) -> torch.Tensor:
    """Rows to keep for the hard batch: 0 (the positive) then the ``hard_size`` negatives
    (rows 1..) with the highest scores, highest first.  ``scores``: [1 + N] or [1 + N, 1]."""
    s = scores.reshape(-1) if scores.dim() == 2 and scores.size(-1) == 1 else scores
    if s.dim() != 1:
        raise ValueError(f"scores must be [1 + N] or [1 + N, 1], got {tuple(scores.shape)}")
    n_neg = s.size(0) - 1
    if not isinstance(hard_size, int) or not 1 <= hard_size <= n_neg:
        raise ValueError(f"hard_size must be an int in [1, {n_neg}] (the batch has {n_neg} "
                         f"negatives), got {hard_size!r}")
    hard = s[1:].topk(hard_size, sorted=True).indices + 1
    return torch.cat([hard.new_zeros(1), hard])


def has_rank_output(state_dict: Mapping[str, Any], model: nn.Module) -> bool:
    """Whether a checkpoint carries a trained ``rank_output`` head for ``model`` (after the
    usual prefix adaptation).  Zero-shot evaluation from a pretraining checkpoint calls
    :meth:`UniterForImageTextRetrieval.init_output` only when it does not; the original
    ``inf_itm.py`` tests ``'rank_output' not in checkpoint``, which is always true for
    keys named ``rank_output.weight``, and so always overwrote a fine-tuned head."""
    adapted, _, _ = adapt_state_dict(state_dict, model)
    return "rank_output.weight" in adapted and "rank_output.bias" in adapted


class UniterForImageTextRetrieval(UniterFinetuneModel):
    """Fine-tune UNITER for image-text retrieval (triplet ranking loss)."""

    reduce_loss = staticmethod(itm_rank_train_loss)

    def __init__(self, config, img_dim: int, margin: float = 0.2):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.margin = float(margin)
        self.apply(self.init_weights)

    def init_output(self) -> None:
        """Start the rank head from the ITM head's "match" row (call after loading a
        pretraining checkpoint)."""
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:, :])
            self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def check_batch(self, batch: Dict[str, Any], compute_loss: bool = True) -> None:
        check_encoder_batch(self.uniter, batch, ["sample_size"] if compute_loss else [],
                            what=f"{type(self).__name__} batch")
        if compute_loss:
            k, b = batch["sample_size"], batch["attn_masks"].size(0)
            if not isinstance(k, int) or k < 2 or b % k:
                raise ValueError(f"{type(self).__name__}: sample_size must be an int >= 2 "
                                 f"dividing the batch's {b} rows, got {k!r}")

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        rank_scores = self.rank_output(self._pooled(batch, compute_loss))
        if not compute_loss:
            return rank_scores
        scores = torch.sigmoid(rank_scores.float()).view(-1, batch["sample_size"])
        return torch.clamp(self.margin + scores[:, 1:] - scores[:, :1], min=0)


class UniterForImageTextRetrievalHardNeg(UniterForImageTextRetrieval):
    """Fine-tune UNITER for image-text retrieval with hard negatives mined in the batch."""

    def __init__(self, config, img_dim: int, margin: float = 0.2, hard_size: int = 16):
        super().__init__(config, img_dim, margin)
        if not isinstance(hard_size, int) or hard_size < 1:
            raise ValueError(f"hard_size must be a positive int, got {hard_size!r}")
        self.hard_size = hard_size

    @staticmethod
    def _expand(batch: Dict[str, Any], sample_from: str) -> Dict[str, Any]:
        """A copy of ``batch`` whose shared side (one text or one image) is expanded to
        every row (views, no copy)."""
        if sample_from not in SAMPLE_DIRECTIONS:
            raise ValueError(f"sample_from must be 't' (negative images) or 'i' (negative "
                             f"texts), got {sample_from!r}")
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        out = dict(batch)
        if not torch.is_tensor(out.get("attn_masks")):
            raise ValueError("hard-negative batch is missing ['attn_masks']")
        b = out["attn_masks"].size(0)
        keys = ("input_ids",) if sample_from == "t" else ("img_feat", "img_pos_feat")
        for k in keys:
            t = out[k]
            if t.size(0) == 1:
                out[k] = t.expand(b, *t.shape[1:])
        return out

    def validate(self, batch: Dict[str, Any], sample_from: str = "t",
                 compute_loss: bool = True) -> None:
        """The checks of :meth:`forward`, eagerly: the expanded batch as the scoring pass
        (training) or the ranking loss (evaluation with ``compute_loss``) reads it."""
        batch = self._expand(batch, sample_from)
        if self.validate_inputs:
            self.check_batch(batch, compute_loss and not self.training)

    def forward(self, batch: Dict[str, Any], sample_from: str = "t",
                compute_loss: bool = True) -> torch.Tensor:
        batch = self._expand(batch, sample_from)
        if not (self.training and compute_loss):
            return super().forward(batch, compute_loss)
        with torch.no_grad():
            self.eval()
            try:
                scores = super().forward(batch, compute_loss=False)
            finally:
                self.train()
            hard_batch = self._get_hard_batch(batch, scores, sample_from)
        return super().forward(hard_batch, compute_loss=True)

    def _get_hard_batch(self, batch: Dict[str, Any], scores: torch.Tensor,
                        sample_from: str = "t") -> Dict[str, Any]:
        """The positive and the ``hard_size`` hardest negatives as a ranking batch
        (``sample_size = hard_size + 1``); for ``'t'`` cut to the longest kept row."""
        n = self.hard_size + 1
        indices = select_hard_negatives(scores, self.hard_size)
        input_ids, position_ids = batch["input_ids"], batch["position_ids"]
        img_feat, img_pos_feat = batch["img_feat"], batch["img_pos_feat"]
        attn = batch["attn_masks"].index_select(0, indices)
        gather = batch["gather_index"].index_select(0, indices)
        if position_ids.size(0) != 1:
            position_ids = position_ids[:n]
        if sample_from == "t":
            # one text for every row: drop the padding the kept images do not need
            # (one host sync, as the original; under torch.compile the padding stays: the
            # same scores, padded keys weigh exactly 0, and no data-dependent shape)
            max_len = attn.size(1) if torch.compiler.is_compiling() else \
                int(attn.sum(dim=1).max())
            max_i = max_len - input_ids.size(1)
            attn, gather = attn[:, :max_len], gather[:, :max_len]
            img_feat = img_feat.index_select(0, indices)[:, :max_i]
            img_pos_feat = img_pos_feat.index_select(0, indices)[:, :max_i]
            input_ids = input_ids[:n]
        else:
            input_ids = input_ids.index_select(0, indices)
            img_feat, img_pos_feat = img_feat[:n], img_pos_feat[:n]
        return {"sample_size": n, "input_ids": input_ids, "position_ids": position_ids,
                "img_feat": img_feat, "img_pos_feat": img_pos_feat, "attn_masks": attn,
                "gather_index": gather}
