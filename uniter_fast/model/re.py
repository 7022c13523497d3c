"""UNITER for referring expression comprehension, drop-in for the original's ``model/re.py``.

``UniterForReferringExpressionComprehension(config, img_dim, loss='cls', margin=0.2,
hard_ratio=0.3, mlp=1)`` scores every region of the image: the encoder's region outputs
through ``re_output`` (``mlp=1``: Linear(H, 1); ``mlp=2``: Linear(H, H), GELU,
LayerNorm(H), Linear(H, 1)), with padded regions (``obj_masks`` = 1) set to -1e4.
``forward(batch, compute_loss=True)`` returns, per expression [n]:

* ``loss='cls'``: the cross-entropy of the region scores against ``targets``;
* ``loss='rank'``: ``clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), 0)`` with one negative
  region per expression, the highest-scoring non-target region with probability
  ``hard_ratio``, else a uniformly drawn non-target region;

or, with ``compute_loss=False``, the region scores [n, max_num_bb].  ``train_re.py``
reduces with ``loss.sum()`` (:func:`re_train_loss`).

The negative draws use torch's global CPU generator (``generator=`` to pass another), so
a resumed run that restores the RNG states draws the same negatives; the original used
Python's and NumPy's global RNGs, one example at a time.
"""
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..constants import ATTENTION_MASK_VALUE, LAYER_NORM_EPS
from .finetune_base import UniterFinetuneModel, check_class_targets
from .layer import GELU, LayerNorm
from .model import UniterModel, check_encoder_batch

__all__ = ["UniterForReferringExpressionComprehension", "re_train_loss", "sample_neg_ix",
           "RE_LOSSES", "RE_MASK_VALUE"]

RE_LOSSES = ("cls", "rank")
#: score given to padded (non-object) regions
RE_MASK_VALUE = ATTENTION_MASK_VALUE


def re_train_loss(loss: torch.Tensor) -> torch.Tensor:
    """``train_re.py``'s reduction of the per-expression loss: the sum over the batch."""
    return loss.sum()


def sample_neg_ix(scores: torch.Tensor, targets: torch.Tensor, num_bbs: Sequence[int],
                  hard_ratio: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One negative region per row [n] (never the target, always < num_bb): with
    probability ``hard_ratio`` the highest-scoring other region, else a uniform draw among
    the other regions.  No host sync: the draws are made on the CPU from ``num_bbs``."""
    n = len(num_bbs)
    targets = targets.reshape(-1)
    if targets.numel() != n or scores.size(0) != n:
        raise ValueError(f"sample_neg_ix: {scores.size(0)} score rows, {targets.numel()} "
                         f"targets and {n} num_bbs must agree")
    if n and min(num_bbs) < 2:
        raise ValueError("the rank loss needs at least 2 regions per image (a target and a "
                         f"negative); num_bbs = {list(num_bbs)}")
    nbb = torch.tensor(list(num_bbs), dtype=torch.long)
    hard = torch.rand(n, generator=generator) < hard_ratio
    easy = (torch.rand(n, generator=generator) * (nbb - 1)).long().clamp_(max=nbb - 2)
    dev = scores.device
    easy = easy.to(dev, non_blocking=True)
    easy = easy + (easy >= targets).long()        # skip the target: uniform over the others
    cols = torch.arange(scores.size(1), device=dev)
    banned = (cols[None, :] == targets[:, None]) | (cols[None, :] >= nbb.to(dev)[:, None])
    hardest = scores.detach().float().masked_fill(banned, float("-inf")).argmax(dim=1)
    return torch.where(hard.to(dev, non_blocking=True), hardest, easy)


def image_hidden(seq: torch.Tensor, txt_lens: Sequence[int], num_bbs: Sequence[int]
                 ) -> torch.Tensor:
    """The region outputs of the compact [text; regions] sequence, [n, max_num_bb, H],
    zero beyond each image's boxes (one gather, index built on the host)."""
    n, max_bb = len(num_bbs), max(num_bbs)
    if len(txt_lens) != n or seq.size(0) != n:
        raise ValueError(f"{seq.size(0)} sequences, {len(txt_lens)} txt_lens and {n} num_bbs "
                         "must agree")
    tl = torch.tensor(list(txt_lens), dtype=torch.long)
    nbb = torch.tensor(list(num_bbs), dtype=torch.long)
    k = torch.arange(max_bb)
    valid = k[None, :] < nbb[:, None]
    idx = torch.where(valid, tl[:, None] + k[None, :], torch.zeros((), dtype=torch.long))
    if max(int(t) + int(b) for t, b in zip(txt_lens, num_bbs)) > seq.size(1):   # host lists
        raise ValueError(f"txt_lens + num_bbs exceed the sequence length {seq.size(1)}")
    idx = idx.to(seq.device, non_blocking=True)
    out = seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, seq.size(-1)))
    return out * valid.to(seq.device, non_blocking=True).unsqueeze(-1).to(out.dtype)


class UniterForReferringExpressionComprehension(UniterFinetuneModel):
    """Fine-tune UNITER for referring expression comprehension (pick the referred region)."""

    reduce_loss = staticmethod(re_train_loss)
    #: generator of the rank loss's negative draws (None: torch's global CPU generator)
    generator: Optional[torch.Generator] = None

    def __init__(self, config, img_dim: int, loss: str = "cls", margin: float = 0.2,
                 hard_ratio: float = 0.3, mlp: int = 1):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        h = config.hidden_size
        if mlp == 1:
            self.re_output = nn.Linear(h, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(nn.Linear(h, h), GELU(), LayerNorm(h, eps=LAYER_NORM_EPS),
                                           nn.Linear(h, 1))
        else:
            raise ValueError(f"mlp must be 1 or 2 (layers of the RE head), got {mlp!r}")
        if loss not in RE_LOSSES:
            raise ValueError(f"loss must be one of {RE_LOSSES}, got {loss!r}")
        self.loss = loss
        if loss == "rank":
            if not 0.0 <= hard_ratio <= 1.0:
                raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio!r}")
            self.margin, self.hard_ratio = float(margin), float(hard_ratio)
        else:
            self.crit = nn.CrossEntropyLoss(reduction="none")
        self.apply(self.init_weights)

    def check_batch(self, batch: Dict[str, Any], compute_loss: bool = True) -> None:
        name = type(self).__name__
        need = ["obj_masks", "txt_lens", "num_bbs"] + (["targets"] if compute_loss else [])
        check_encoder_batch(self.uniter, batch, need, what=f"{name} batch")
        n, max_bb = batch["input_ids"].size(0), batch["img_feat"].size(1)
        txt_lens, num_bbs = list(batch["txt_lens"]), list(batch["num_bbs"])
        if len(txt_lens) != n or len(num_bbs) != n:
            raise ValueError(f"{name}: txt_lens ({len(txt_lens)}) and num_bbs ({len(num_bbs)}) "
                             f"must have one entry per example ({n})")
        if any(not 1 <= b <= max_bb for b in num_bbs):
            raise ValueError(f"{name}: num_bbs must be in [1, {max_bb}], got {num_bbs}")
        if tuple(batch["obj_masks"].shape) != (n, max(num_bbs)):
            raise ValueError(f"{name}: obj_masks must be [n, max_num_bb] = "
                             f"{[n, max(num_bbs)]}, got {list(batch['obj_masks'].shape)}")
        if compute_loss:
            check_class_targets(name, batch["targets"].reshape(-1), n, max(num_bbs))

    def forward(self, batch: Dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
        seq = self._encode(batch, compute_loss)
        txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
        hidden = image_hidden(seq, txt_lens, num_bbs)
        scores = self.re_output(hidden).squeeze(2)
        scores = scores.masked_fill(batch["obj_masks"].bool(), RE_MASK_VALUE)
        if not compute_loss:
            return scores
        targets = batch["targets"].reshape(-1)
        if self.loss == "cls":
            return self.crit(scores.float(), targets)
        neg_ix = sample_neg_ix(scores, targets, num_bbs, self.hard_ratio, self.generator)
        pos_sc = torch.sigmoid(scores.float().gather(1, targets[:, None])).view(-1)
        neg_sc = torch.sigmoid(scores.float().gather(1, neg_ix[:, None])).view(-1)
        return torch.clamp(self.margin + neg_sc - pos_sc, min=0)
