"""UNITER model; module paths mirror the original (model.model, model.pretrain, model.layer, model.ot)."""
from .model import UniterModel, UniterPreTrainedModel
from .pretrain import TASKS, UniterForPretraining, itm_ot_loss

__all__ = ["UniterModel", "UniterPreTrainedModel", "UniterForPretraining", "itm_ot_loss", "TASKS"]
