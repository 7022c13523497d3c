"""VCR evaluation as the original ``train_vcr.py`` / ``inf_vcr.py``: Q->A, QA->R and joint
accuracy (``acc_qa``, ``acc_qar``, ``acc``), the summed cross-entropies, the per-question
score lists and the leaderboard CSV."""
from __future__ import annotations

import csv
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["qar_scores", "compute_accuracies", "VcrEvaluator", "vcr_submission_rows",
           "write_vcr_submission", "VCR_SUBMISSION_GROUPS"]

_N = 4  # answers per question, rationales per answer
#: column groups of the leaderboard CSV (``inf_vcr.py``'s ``save_for_submission``)
VCR_SUBMISSION_GROUPS = ("answer",) + tuple(f"rationale_conditioned_on_a{i}" for i in range(_N))


def qar_scores(scores: torch.Tensor, qa_targets: torch.Tensor) -> torch.Tensor:
    """The 4 QA->R scores of each question [n, 4]: from 8-row (val) questions the last 4;
    from 20-row (test layout) questions the 4 of the right answer ``qa_targets``."""
    if scores.size(1) > 2 * _N:
        a = qa_targets.reshape(-1).long()
        idx = _N + a[:, None] * _N + torch.arange(_N, device=scores.device)[None, :]
        return scores.gather(1, idx)
    return scores[:, _N:]


def compute_accuracies(out_qa: torch.Tensor, labels_qa: torch.Tensor, out_qar: torch.Tensor,
                       labels_qar: torch.Tensor) -> Tuple[int, int, int]:
    """(correct Q->A, correct QA->R, both correct), as the original."""
    ok_qa = out_qa.max(dim=-1)[1].view(-1) == labels_qa.view(-1)
    ok_qar = out_qar.max(dim=-1)[1].view(-1) == labels_qar.view(-1)
    counts = torch.stack([ok_qa.sum(), ok_qar.sum(), (ok_qa & ok_qar).sum()]).tolist()
    return int(counts[0]), int(counts[1]), int(counts[2])


class VcrEvaluator:
    """Accumulates the original's VCR validation over ``vcr_eval_collate`` batches.

    ``update(scores, batch)`` with the model's scores [rows, 1] (``compute_loss=False``);
    ``results`` maps qid -> that question's score list (8 or 20 floats);
    ``totals()`` gives the sums to all-reduce across ranks; ``metrics(totals)`` the
    original's ``vcr_qa_loss``, ``vcr_qar_loss``, ``acc_qa``, ``acc_qar``, ``acc``.
    Batches without labels (test split: ``qa_targets`` -1) only add results.
    """

    KEYS = ("vcr_qa_loss", "vcr_qar_loss", "n_qa", "n_qar", "n_joint", "n_ex")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.results: Dict[str, List[float]] = {}

    def update(self, scores: torch.Tensor, batch: Mapping[str, Any]) -> None:
        qids = batch["qids"]
        scores = scores.reshape(len(qids), -1)
        qa_t, qar_t = batch["qa_targets"].reshape(-1), batch["qar_targets"].reshape(-1)
        if bool(qa_t.max() > -1):
            qar = qar_scores(scores, qa_t)
            s = scores.float()
            qa_loss = F.cross_entropy(s[:, :_N], qa_t, reduction="sum")
            qar_loss = F.cross_entropy(qar.float(), qar_t, reduction="sum")
            n_qa, n_qar, n_joint = compute_accuracies(s[:, :_N], qa_t, qar, qar_t)
            self.sums["vcr_qa_loss"] += float(qa_loss)
            self.sums["vcr_qar_loss"] += float(qar_loss)
            self.sums["n_qa"] += n_qa
            self.sums["n_qar"] += n_qar
            self.sums["n_joint"] += n_joint
        self.sums["n_ex"] += len(qids)
        for qid, row in zip(qids, scores.float().cpu().tolist()):
            self.results[qid] = row

    def totals(self) -> List[float]:
        return [self.sums[k] for k in self.KEYS]

    @classmethod
    def metrics(cls, totals: Sequence[float]) -> Dict[str, float]:
        t = dict(zip(cls.KEYS, totals))
        n = t["n_ex"]
        if n <= 0:
            raise ValueError("VcrEvaluator: no examples were evaluated")
        return {"vcr_qa_loss": t["vcr_qa_loss"] / n, "vcr_qar_loss": t["vcr_qar_loss"] / n,
                "acc_qa": t["n_qa"] / n, "acc_qar": t["n_qar"] / n, "acc": t["n_joint"] / n}


def vcr_submission_rows(results: Mapping[str, Sequence[float]]) -> Tuple[List[str], List[list]]:
    """(header, rows) of the leaderboard CSV from test-layout results (qid -> 20 scores):
    ``annot_id`` then ``answer_0..3`` and ``rationale_conditioned_on_a{i}_{j}``, rows ordered
    by the number after the first '-' of the id (``test-123``), as ``inf_vcr.py``."""
    header = ["annot_id"] + [f"{g}_{i}" for g in VCR_SUBMISSION_GROUPS for i in range(_N)]
    rows = []
    for qid, scores in sorted(results.items(), key=lambda kv: int(kv[0].split("-")[1])):
        if len(scores) != len(VCR_SUBMISSION_GROUPS) * _N:
            raise ValueError(f"question {qid!r} has {len(scores)} scores; the submission needs "
                             f"{len(VCR_SUBMISSION_GROUPS) * _N} (the test layout)")
        rows.append([qid] + [float(s) for s in scores])
    return header, rows


def write_vcr_submission(results: Mapping[str, Sequence[float]], path: str) -> None:
    header, rows = vcr_submission_rows(results)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
