"""Conditional masking for UNITER pretraining (MLM on text, MRM on regions).

UNITER masks *one* modality per example ("conditional masking"): an MLM example
masks text tokens and sees every region intact; an MRFR / MRC example masks
regions and sees the full caption.  The helpers here take an explicit RNG
(``random.Random``) so every mask is reproducible from a seed.

Semantics follow the original ``data/mlm.py`` / ``data/mrm.py``:

* text: each token is selected with probability ``mask_prob`` (0.15); a selected
  token becomes ``[MASK]`` with prob 0.8, a random id from ``v_range`` with prob
  0.1, or stays unchanged with prob 0.1.  Its label is the original id; every
  other label is -1.  If nothing was selected, token 0 is masked (``[MASK]``).
* regions: each region is selected with probability ``mask_prob``; if none is,
  one region is chosen uniformly.  Selected features are zeroed *after* the
  regression targets were taken.

``MASKING_MODES``: ``"conditional"`` (UNITER, the default) or ``"joint"`` (the
paper's ablation: an MLM example also has its regions masked at ``mrm_prob``
(features zeroed) and an MRM example its tokens at ``mlm_prob``, 80/10/10; the
loss stays on the task's own modality).
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["random_word", "region_mask", "img_mask_target", "mask_img_feat",
           "soft_label_targets", "conditional_mask", "MODALITIES", "MASKING_MODES"]

MODALITIES = ("text", "image", "none")
MASKING_MODES = ("conditional", "joint")


def _check_rng(rng) -> None:
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random instance, got {type(rng).__name__}")


def _check_prob(p: float, name: str) -> None:
    if not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def random_word(tokens: Sequence[int], v_range: Sequence[int], mask_id: int,
                rng: random.Random, mask_prob: float = 0.15, at_least_one: bool = True
                ) -> Tuple[List[int], List[int]]:
    """BERT-style token masking of one caption (no CLS/SEP).

    Returns ``(masked_tokens, labels)``: new lists (the input is not modified),
    labels are the original ids at selected positions and -1 elsewhere.  At
    least one position is always selected (unless ``at_least_one=False``: the
    joint-masking ablation's second modality).
    """
    _check_rng(rng)
    _check_prob(mask_prob, "mask_prob")
    if len(tokens) == 0:
        raise ValueError("random_word: cannot mask an empty caption (need >= 1 token)")
    lo, hi = int(v_range[0]), int(v_range[1])
    if hi <= lo:
        raise ValueError(f"random_word: empty vocabulary range v_range={list(v_range)}")
    out = [int(t) for t in tokens]
    labels = [-1] * len(out)
    for i, tok in enumerate(out):
        p = rng.random()
        if p < mask_prob:
            p /= mask_prob
            if p < 0.8:
                out[i] = mask_id
            elif p < 0.9:
                out[i] = rng.randrange(lo, hi)
            # else: keep the token
            labels[i] = tok
    if at_least_one and all(lab == -1 for lab in labels):
        labels[0] = out[0]
        out[0] = mask_id
    return out, labels


def region_mask(num_bb: int, mask_prob: float, rng: random.Random,
                at_least_one: bool = True) -> torch.Tensor:
    """Bool mask [num_bb] with each region selected w.p. ``mask_prob``, at least one
    (unless ``at_least_one=False``)."""
    _check_rng(rng)
    _check_prob(mask_prob, "mask_prob")
    num_bb = int(num_bb)
    if num_bb < 1:
        raise ValueError(f"region_mask: need at least one region, got num_bb={num_bb}")
    sel = [rng.random() < mask_prob for _ in range(num_bb)]
    if at_least_one and not any(sel):
        sel[rng.randrange(num_bb)] = True
    return torch.tensor(sel, dtype=torch.bool)


def img_mask_target(img_mask: torch.Tensor, txt_len: int) -> torch.Tensor:
    """Mask over the joint [text; image] sequence: False for text, img_mask for regions."""
    return torch.cat([torch.zeros(int(txt_len), dtype=torch.bool), img_mask.bool()], dim=0)


def mask_img_feat(img_feat: torch.Tensor, img_masks: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_feat, feat_targets)``.

    ``img_feat`` [..., n, d], ``img_masks`` bool [..., n].  ``feat_targets`` [s, d]
    are the original features of the selected regions (taken before zeroing),
    ``masked_feat`` is a copy with those regions set to 0.
    """
    if img_masks.shape != img_feat.shape[:-1]:
        raise ValueError(f"img_masks shape {tuple(img_masks.shape)} does not match "
                         f"img_feat shape {tuple(img_feat.shape)}")
    m = img_masks.bool()
    feat_targets = img_feat[m].contiguous()
    masked = img_feat.masked_fill(m.unsqueeze(-1), 0)
    return masked, feat_targets


def soft_label_targets(img_soft_label: torch.Tensor, img_masks: torch.Tensor) -> torch.Tensor:
    """Soft detector labels [s, label_dim] of the selected regions (MRC targets)."""
    if img_masks.shape != img_soft_label.shape[:-1]:
        raise ValueError(f"img_masks shape {tuple(img_masks.shape)} does not match "
                         f"soft label shape {tuple(img_soft_label.shape)}")
    return img_soft_label[img_masks.bool()].contiguous()


def conditional_mask(tokens: Sequence[int], num_bb: int, rng: random.Random, *,
                     v_range: Sequence[int], mask_id: int, modality: Optional[str] = None,
                     mlm_prob: float = 0.15, mrm_prob: float = 0.15) -> Dict[str, object]:
    """Mask exactly one modality of one example.

    ``modality`` is "text" (MLM), "image" (MRM) or "none" (ITM); ``None`` draws
    text or image with equal probability from ``rng``.  Returns a dict with
    ``modality``, ``input_ids`` (caption ids, possibly masked), ``txt_labels``
    (all -1 unless text is masked) and ``img_mask`` (bool [num_bb], all False
    unless regions are masked).
    """
    _check_rng(rng)
    if modality is None:
        modality = "text" if rng.random() < 0.5 else "image"
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
    num_bb = int(num_bb)
    if num_bb < 0:
        raise ValueError(f"num_bb must be >= 0, got {num_bb}")
    ids = [int(t) for t in tokens]
    if modality == "text":
        ids, labels = random_word(ids, v_range, mask_id, rng, mlm_prob)
        img_mask = torch.zeros(num_bb, dtype=torch.bool)
    elif modality == "image":
        labels = [-1] * len(ids)
        img_mask = region_mask(num_bb, mrm_prob, rng)
    else:
        labels = [-1] * len(ids)
        img_mask = torch.zeros(num_bb, dtype=torch.bool)
    return {"modality": modality, "input_ids": ids, "txt_labels": labels, "img_mask": img_mask}
