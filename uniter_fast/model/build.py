"""What every recipe does to a model around ``from_pretrained``: read the training config's
``model_config``, check the text db fits it, apply the config's ``dropout``.

Pretraining (:mod:`uniter_fast.training.pretrain`), the fine-tuning tasks
(:mod:`uniter_fast.tasks`) and inference import these from here.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ..config import UniterConfig, config_path

__all__ = ["load_model_config", "model_config_path", "set_dropout", "check_text_fits", "DEFAULT_MAX_TXT_LEN"]

#: ``max_txt_len`` of UNITER's training scripts when a config has none
DEFAULT_MAX_TXT_LEN = 60


def model_config_path(cfg: Dict[str, Any]) -> str:
    """The JSON file of the training config's ``model_config`` (a path or a packaged name)."""
    mc = cfg["model_config"]
    return mc if os.path.exists(mc) else config_path(mc)


def load_model_config(cfg: Dict[str, Any]) -> UniterConfig:
    """The training config's ``model_config``: a JSON path or a packaged name."""
    return UniterConfig(model_config_path(cfg))


def set_dropout(model: torch.nn.Module, p: Optional[float]) -> None:
    """The training config's ``dropout`` on every dropout layer (None: keep the model's)."""
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = float(p)


def check_text_fits(config: UniterConfig, meta: Dict[str, Any], cfg: Dict[str, Any]) -> None:
    """The text db's vocabulary and the config's ``max_txt_len`` fit the model."""
    if meta.get("v_range") and meta["v_range"][1] > config.vocab_size:
        raise ValueError(f"text db vocabulary (v_range {meta['v_range']}) exceeds the model's "
                         f"vocab_size {config.vocab_size}")
    max_len = cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN)
    if max_len + 2 > config.max_position_embeddings:
        raise ValueError(f"max_txt_len {max_len} + 2 exceeds "
                         f"max_position_embeddings {config.max_position_embeddings}")
