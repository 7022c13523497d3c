"""UNITER pretraining as a :class:`~uniter_fast.training.task.TrainTask`:
mlm, mrfr, mrc, mrc-kl and itm (+ WRA) mixed by the config's mix ratios."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from ..config import CONFIG_DIR, UniterConfig, config_path
from ..data import create_train_loader, create_val_loaders, task_of, text_meta
from .loop import Trainer
from .pretrain_eval import format_summary, summary_rows, validate_pretrain, wra_loader
from .task import TrainTask

__all__ = ["DESCRIPTION", "DEFAULT_CONFIG", "IMG_DIM", "IMG_LABEL_DIM", "PretrainTask", "build_model",
           "compute_loss", "load_model_config", "main", "validate_pretrain"]

DESCRIPTION = "UNITER pretraining under DeepSpeed."
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "pretrain-synthetic-tiny.json")
IMG_DIM, IMG_LABEL_DIM = 2048, 1601   # UNITER's constants (real BUTD features)

# every top-level key of UNITER's pretraining configs and pretrain.py options (read or
# accepted for compatibility: fp16/optim/rank are replaced by ds.json and the launcher)
# plus this package's own; anything else is reported as unknown
PRETRAIN_KEYS = frozenset({
    "model_config", "checkpoint", "output_dir", "mrm_prob", "itm_neg_prob", "itm_ot_lambda",
    "max_txt_len", "conf_th", "max_bb", "min_bb", "num_bb", "compressed_db",
    "train_batch_size", "val_batch_size", "gradient_accumulation_steps", "learning_rate",
    "valid_steps", "num_train_steps", "optim", "betas", "dropout", "weight_decay",
    "grad_norm", "warmup_steps", "seed", "fp16", "n_workers", "pin_mem", "rank",
    "train_datasets", "val_datasets",
    "img_dim", "img_label_dim", "bucket_size", "save_steps", "log_steps",
    "keep_checkpoints", "synthetic", "masking"})


def load_model_config(cfg: Dict[str, Any]) -> UniterConfig:
    """The training config's ``model_config``: a JSON path or a packaged name."""
    mc = cfg["model_config"]
    if not os.path.exists(mc):
        mc = config_path(mc)
    return UniterConfig(mc)


def set_dropout(model: torch.nn.Module, p: Optional[float]) -> None:
    """The training config's ``dropout`` on every dropout layer (None: keep the model's)."""
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = float(p)


def check_text_fits(config: UniterConfig, meta: Dict[str, Any], cfg: Dict[str, Any]) -> None:
    if meta.get("v_range") and meta["v_range"][1] > config.vocab_size:
        raise ValueError(f"text db vocabulary (v_range {meta['v_range']}) exceeds the model's "
                         f"vocab_size {config.vocab_size}")
    if cfg.get("max_txt_len", 60) + 2 > config.max_position_embeddings:
        raise ValueError(f"max_txt_len {cfg.get('max_txt_len', 60)} + 2 exceeds "
                         f"max_position_embeddings {config.max_position_embeddings}")


def build_model(cfg: Dict[str, Any], meta: Dict[str, Any]):
    from ..model import UniterForPretraining
    config = load_model_config(cfg)
    img_dim = int(cfg.get("img_dim") or IMG_DIM)
    label_dim = int(cfg.get("img_label_dim") or meta.get("img_label_dim") or IMG_LABEL_DIM)
    check_text_fits(config, meta, cfg)
    if cfg.get("checkpoint"):
        state = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        model = UniterForPretraining.from_pretrained(config, state, img_dim=img_dim,
                                                     img_label_dim=label_dim)
    else:
        model = UniterForPretraining(config, img_dim=img_dim, img_label_dim=label_dim)
    set_dropout(model, cfg.get("dropout"))
    return model


def compute_loss(model, batch, task: str, itm_ot_lambda: float):
    """UNITER's per-task loss: itm via itm_ot_loss, others the mean of the
    per-element losses.  Returns (loss, extra logs)."""
    from ..model import itm_ot_loss
    out = model(batch, task=task, compute_loss=True)
    if task == "itm":
        itm_loss, ot = out
        loss = itm_ot_loss(itm_loss, ot, itm_ot_lambda)
        extra = {"itm_xe": float(itm_loss.mean().detach())}
        if ot is not None:
            pos, neg = ot
            if pos.numel():
                extra["ot_pos"] = float(pos.mean().detach())
            if neg.numel():
                extra["ot_neg"] = float(neg.mean().detach())
        return loss, extra
    return out.mean(), {}


class PretrainTask(TrainTask):
    name = "pretrain"
    known_keys = PRETRAIN_KEYS

    def prepare_data(self, cfg, rank):
        self._meta = text_meta(cfg)      # generates the synthetic dbs on first use

    def data_meta(self, cfg):
        return self._meta

    def train_loader(self, cfg, rank, world_size, accum_steps):
        return create_train_loader(cfg, rank, world_size, accum_steps=accum_steps)

    def val_loaders(self, cfg, rank, world_size):
        loaders = create_val_loaders(cfg, rank, world_size)
        # WRA distances / alignment on every itm validation db, whether or not WRA is trained
        for name in list(loaders):
            if task_of(name) == "itm":
                loaders["wra_" + name.split("_", 1)[1]] = wra_loader(loaders[name], cfg)
        return loaders

    def build_model(self, cfg, meta):
        return build_model(cfg, meta)

    def compute_loss(self, engine, name, batch, cfg):
        return compute_loss(engine, batch, task_of(name), float(cfg.get("itm_ot_lambda", 0.0)))

    def validate(self, engine, val_loaders, ctx):
        return validate_pretrain(engine, val_loaders, ctx, self._meta)

    def end_of_run(self, engine, ctx, summary):
        """Each objective's last validation metric beside its baseline (and, on the
        synthetic data, the README's target): in the summary and printed on rank 0."""
        synthetic = any(db.startswith("synthetic:") for d in ctx.cfg.get("val_datasets") or []
                        for db in d.get("db", []))
        rows = summary_rows(summary.get("validation") or {}, with_targets=synthetic)
        summary["objectives"] = rows
        if ctx.rank == 0 and rows:
            print("validation at step {}:\n{}".format(summary.get("step"), format_summary(rows)),
                  flush=True)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return Trainer(PretrainTask(), DEFAULT_CONFIG, DESCRIPTION).run(argv)
