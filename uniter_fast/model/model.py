"""UNITER's joint vision-language encoder (``UniterModel``), drop-in for ``model/model.py``."""
import copy
import logging
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..config import UniterConfig, config_path
from .layer import BertLayer, BertPooler, LayerNorm

logger = logging.getLogger(__name__)

__all__ = ["UniterConfig", "UniterPreTrainedModel", "UniterTextEmbeddings",
           "UniterImageEmbeddings", "UniterEncoder", "UniterModel"]


def _load_config(config_file: Union[str, Dict[str, Any], UniterConfig]) -> UniterConfig:
    if isinstance(config_file, UniterConfig):
        return config_file
    if isinstance(config_file, dict):
        return UniterConfig.from_dict(config_file)
    if isinstance(config_file, str) and not config_file.endswith(".json") and "/" not in config_file:
        return UniterConfig.from_json_file(config_path(config_file))
    return UniterConfig.from_json_file(config_file)


class UniterPreTrainedModel(nn.Module):
    """Weight initialisation and ``from_pretrained`` as in UNITER."""

    def __init__(self, config: UniterConfig, *inputs, **kwargs):
        super().__init__()
        if not isinstance(config, UniterConfig):
            raise ValueError(f"config of {type(self).__name__} must be a UniterConfig, "
                             f"got {type(config).__name__}")
        self.config = config

    def init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, config_file, state_dict: Dict[str, torch.Tensor], *inputs, **kwargs):
        """Build from a config (JSON path, shipped name, dict or UniterConfig) and a state dict.

        As in UNITER: TF-style ``gamma``/``beta`` names are renamed, a
        ``bert.`` prefix is handled, missing/unexpected keys are logged, and a
        shape mismatch raises.
        """
        config = _load_config(config_file)
        model = cls(config, *inputs, **kwargs)
        renamed = {}
        for key, value in state_dict.items():
            new_key = key.replace("gamma", "weight") if "gamma" in key else key
            new_key = new_key.replace("beta", "bias") if "beta" in new_key else new_key
            renamed[new_key] = value
        own = model.state_dict()
        if not any(k.startswith("bert.") for k in own) and any(k.startswith("bert.") for k in renamed):
            renamed = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in renamed.items()}
        result = model.load_state_dict(renamed, strict=False)
        if result.missing_keys:
            logger.info("Weights of %s not initialized from pretrained model: %s",
                        cls.__name__, result.missing_keys)
        if result.unexpected_keys:
            logger.info("Weights from pretrained model not used in %s: %s",
                        cls.__name__, result.unexpected_keys)
        return model


class UniterTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
               + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(emb))


class UniterImageEmbeddings(nn.Module):
    def __init__(self, config, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):
        if img_masks is not None:
            # Row 0 of mask_embedding means "not masked" and contributes zero
            # (the original zeroes that row in place on every call; multiplying
            # by the mask gives the same output without writing a parameter).
            m = img_masks.long()
            img_feat = img_feat + self.mask_embedding(m) * (m != 0).unsqueeze(-1).to(img_feat.dtype)
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        emb = transformed_im + transformed_pos + type_embeddings
        return self.dropout(self.LayerNorm(emb))


class UniterEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        layer = BertLayer(config)
        self.layer = nn.ModuleList([copy.deepcopy(layer) for _ in range(config.num_hidden_layers)])

    def forward(self, input_, attention_mask, output_all_encoded_layers=True):
        """attention_mask: [batch, seq], 1 = real token."""
        all_layers = []
        hidden = input_
        for layer_module in self.layer:
            hidden = layer_module(hidden, attention_mask)
            if output_all_encoded_layers:
                all_layers.append(hidden)
        if not output_all_encoded_layers:
            all_layers.append(hidden)
        return all_layers


class UniterModel(UniterPreTrainedModel):
    """Single-stream encoder over [text tokens; image regions], compacted by ``gather_index``."""

    def __init__(self, config: UniterConfig, img_dim: int):
        super().__init__(config)
        if not isinstance(img_dim, int) or img_dim < 1:
            raise ValueError(f"img_dim must be a positive int, got {img_dim!r}")
        self.img_dim = img_dim
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self.init_weights)

    def _compute_txt_embeddings(self, input_ids, position_ids, txt_type_ids=None):
        return self.embeddings(input_ids, position_ids, txt_type_ids)

    def _compute_img_embeddings(self, img_feat, img_pos_feat, img_masks=None, img_type_ids=None):
        if img_type_ids is None:
            img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        img_type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        return self.img_embeddings(img_feat, img_pos_feat, img_type_embeddings, img_masks)

    def _compute_img_txt_embeddings(self, input_ids, position_ids, img_feat, img_pos_feat,
                                    gather_index, img_masks=None, txt_type_ids=None,
                                    img_type_ids=None):
        txt_emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids)
        img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids)
        if gather_index is None:
            return torch.cat([txt_emb, img_emb], dim=1)
        index = gather_index.long().unsqueeze(-1).expand(-1, -1, txt_emb.size(-1))
        return torch.gather(torch.cat([txt_emb, img_emb], dim=1), dim=1, index=index)

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                gather_index=None, img_masks=None, output_all_encoded_layers=True,
                txt_type_ids=None, img_type_ids=None):
        """Encode; ``attention_mask`` is UNITER's ``attn_masks`` [batch, seq] (1 = real)."""
        img_feat = _to_param_dtype(img_feat, self)
        img_pos_feat = _to_param_dtype(img_pos_feat, self)
        if input_ids is None:
            emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids)
        elif img_feat is None:
            emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids)
        else:
            emb = self._compute_img_txt_embeddings(input_ids, position_ids, img_feat, img_pos_feat,
                                                   gather_index, img_masks, txt_type_ids,
                                                   img_type_ids)
        layers = self.encoder(emb, attention_mask, output_all_encoded_layers)
        return layers if output_all_encoded_layers else layers[-1]


def _to_param_dtype(x: Optional[torch.Tensor], module: nn.Module) -> Optional[torch.Tensor]:
    """Cast float inputs to the model's parameter dtype (bf16/fp16 training)."""
    if x is None:
        return None
    dtype = module.embeddings.word_embeddings.weight.dtype
    return x.to(dtype) if x.dtype != dtype and x.is_floating_point() else x
