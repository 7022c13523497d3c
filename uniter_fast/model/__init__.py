"""UNITER model; module paths mirror the original (model.model, model.pretrain, model.layer,
model.ot, model.vqa, model.ve, model.nlvr2, model.attention)."""
from .attention import AttentionPool, MultiheadAttention
from .model import LoadReport, UniterModel, UniterPreTrainedModel, load_checkpoint
from .nlvr2 import (
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    nlvr2_train_loss,
)
from .pretrain import TASKS, UniterForPretraining, itm_ot_loss
from .ve import UniterForVisualEntailment
from .vqa import UniterForVisualQuestionAnswering, vqa_train_loss

__all__ = ["UniterModel", "UniterPreTrainedModel", "UniterForPretraining", "itm_ot_loss", "TASKS",
           "UniterForVisualQuestionAnswering", "UniterForVisualEntailment",
           "UniterForNlvr2Paired", "UniterForNlvr2Triplet", "UniterForNlvr2PairedAttn",
           "MultiheadAttention", "AttentionPool", "vqa_train_loss", "nlvr2_train_loss",
           "LoadReport", "load_checkpoint"]
