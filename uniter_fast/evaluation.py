"""The fine-tuning tasks' metrics, as the original UNITER scripts compute them.

* VQA (and VE, which UNITER scores the same way): the soft score of the arg-max
  answer, ``compute_score_with_logits`` in ``train_vqa.py``: the target row holds
  each answer's score (VQA: min(#humans who gave it / 3, 1); VE: one-hot), so the
  mean over questions is the VQA score (VE: the accuracy).
* NLVR2: accuracy, and consistency as the official ``eval_nlvr2.py`` defines it:
  the fraction of statements (the identifier ``split-set-pair-sentence`` without
  its pair field) whose every image pair is answered correctly.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

__all__ = ["answer_scores", "nlvr2_statement", "nlvr2_consistency"]


def answer_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] target score of each row's arg-max answer (UNITER's compute_score_with_logits)."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must "
                         "both be [B, num_answers]")
    return targets.float().gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def nlvr2_statement(identifier: str) -> str:
    """The statement an NLVR2 identifier belongs to (its pair field blanked, as eval_nlvr2.py)."""
    parts = str(identifier).split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set-pair-sentence")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_consistency(identifiers: Sequence[str], correct: Sequence[bool]) -> float:
    """Fraction of statements whose every example in ``identifiers`` is ``correct``."""
    if len(identifiers) != len(correct):
        raise ValueError(f"{len(identifiers)} identifiers but {len(correct)} results")
    ok: Dict[str, bool] = {}
    for ident, c in zip(identifiers, correct):
        key = nlvr2_statement(ident)
        ok[key] = ok.get(key, True) and bool(c)
    return sum(ok.values()) / len(ok) if ok else 0.0
