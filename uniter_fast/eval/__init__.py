"""Evaluation pieces of the fine-tuning tasks: retrieval (score matrix, gather, recalls),
referring expressions (IoU accuracy) and VCR (accuracies, submission CSV)."""
from .itr import (
    gather_score_matrix,
    itm_dataset_scores,
    itm_eval,
    itm_loop_scores,
    itr_score_matrix,
    score_head,
)
from .re import re_accuracy, re_eval_batch
from .vcr import (
    VcrEvaluator,
    compute_accuracies,
    qar_scores,
    vcr_submission_rows,
    write_vcr_submission,
)

__all__ = ["itm_eval", "gather_score_matrix", "itr_score_matrix", "itm_dataset_scores",
           "itm_loop_scores", "score_head", "re_eval_batch", "re_accuracy", "VcrEvaluator",
           "compute_accuracies", "qar_scores", "vcr_submission_rows", "write_vcr_submission"]
