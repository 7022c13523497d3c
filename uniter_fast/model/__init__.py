"""UNITER model; module paths mirror the original (model.model, model.pretrain, model.layer,
model.ot, model.vqa, model.ve, model.nlvr2, model.attention, model.itm, model.re, model.vcr,
model.pretrain_vcr)."""
from .attention import AttentionPool, MultiheadAttention
from .itm import (
    UniterForImageTextRetrieval,
    UniterForImageTextRetrievalHardNeg,
    has_rank_output,
    itm_hard_neg_train_loss,
    itm_rank_train_loss,
    select_hard_negatives,
)
from .model import LoadReport, UniterModel, UniterPreTrainedModel, load_checkpoint
from .nlvr2 import (
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    nlvr2_train_loss,
)
from .pretrain import TASKS, UniterForPretraining, itm_ot_loss
from .pretrain_vcr import UniterForPretrainingForVCR
from .re import UniterForReferringExpressionComprehension, re_train_loss, sample_neg_ix
from .vcr import UniterForVisualCommonsenseReasoning, vcr_train_loss
from .ve import UniterForVisualEntailment
from .vqa import UniterForVisualQuestionAnswering, vqa_train_loss

__all__ = ["UniterModel", "UniterPreTrainedModel", "UniterForPretraining", "itm_ot_loss", "TASKS",
           "UniterForVisualQuestionAnswering", "UniterForVisualEntailment",
           "UniterForNlvr2Paired", "UniterForNlvr2Triplet", "UniterForNlvr2PairedAttn",
           "MultiheadAttention", "AttentionPool", "vqa_train_loss", "nlvr2_train_loss",
           "LoadReport", "load_checkpoint",
           "UniterForImageTextRetrieval", "UniterForImageTextRetrievalHardNeg",
           "UniterForReferringExpressionComprehension", "UniterForVisualCommonsenseReasoning",
           "UniterForPretrainingForVCR", "itm_rank_train_loss", "itm_hard_neg_train_loss",
           "select_hard_negatives", "has_rank_output", "re_train_loss", "sample_neg_ix",
           "vcr_train_loss"]
