"""UNITER pretraining as a :class:`~uniter_fast.training.task.TrainTask`:
mlm, mrfr, mrc, mrc-kl and itm (+ WRA) mixed by the config's mix ratios."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ..config import CONFIG_DIR
from ..constants import IMG_DIM, IMG_LABEL_DIM
from ..data import create_train_loader, create_val_loaders, task_of, text_meta
from ..model.build import check_text_fits, load_model_config, set_dropout
from .loop import Trainer
from .pretrain_eval import format_summary, summary_rows, validate_pretrain, wra_loader
from .task import TrainTask

__all__ = ["DESCRIPTION", "DEFAULT_CONFIG", "PretrainTask", "build_model", "compute_loss", "main",
           "validate_pretrain"]

DESCRIPTION = "UNITER pretraining under DeepSpeed."
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "pretrain-synthetic-tiny.json")

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


def build_model(cfg: Dict[str, Any], meta: Dict[str, Any]):
    from ..model import UniterForPretraining
    config = load_model_config(cfg)
    img_dim = int(cfg.get("img_dim") or IMG_DIM)
    label_dim = int(cfg.get("img_label_dim") or meta.get("img_label_dim") or IMG_LABEL_DIM)
    check_text_fits(config, meta, cfg)
    if cfg.get("checkpoint"):
        from ..export import load_state_dict_file  # weights_only + the allow-list
        state = load_state_dict_file(cfg["checkpoint"])
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
        synthetic data, the target of docs/pretraining.md): in the summary and printed on rank 0."""
        synthetic = any(db.startswith("synthetic:") for d in ctx.cfg.get("val_datasets") or []
                        for db in d.get("db", []))
        rows = summary_rows(summary.get("validation") or {}, with_targets=synthetic)
        summary["objectives"] = rows
        if ctx.rank == 0 and rows:
            print("validation at step {}:\n{}".format(summary.get("step"), format_summary(rows)),
                  flush=True)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return Trainer(PretrainTask(), DEFAULT_CONFIG, DESCRIPTION).run(argv)


def checkpoint_from_state_dict(pt_path: str, ckpt_dir: str, config: Optional[str] = None,
                               deepspeed_config: Optional[str] = None) -> str:
    """A world-size-1 DeepSpeed checkpoint (tag ``global_step0``) of the pretraining model
    holding the weights of ``pt_path`` (every key must match; the tied weights may be
    missing), built as ``train.py`` builds it from ``config`` (default: the packaged
    default); continue it with ``train.py --resume`` at world size 1."""
    from .. import checkpoint as ckpt_lib
    from ..export import check_keys, fill_tied_weights, load_state_dict_file
    from .config import build_arg_parser, fp32_if_bf16_emulated, from_pt_argv, load_configs
    from .distributed import init_distributed
    from .engine import create_engine, param_groups
    targs = build_arg_parser(DESCRIPTION, DEFAULT_CONFIG).parse_args(
        from_pt_argv(ckpt_dir, config, deepspeed_config))
    cfg, ds = load_configs(targs)
    # the precision a new run would train in (fp32 where bf16 would be emulated)
    fp32_if_bf16_emulated(ds, targs, "export")
    cfg["checkpoint"] = None
    ckpt_lib.check_new_checkpoint_dir(ckpt_dir)
    init_distributed()
    import torch.distributed as dist
    if dist.get_world_size() != 1:
        raise ValueError("from-pt runs in a single process")
    model = build_model(cfg, text_meta(cfg))
    sd = fill_tied_weights(load_state_dict_file(pt_path))
    check_keys(model, sd, f"the weights of {pt_path}")
    model.load_state_dict(sd, strict=True)
    wd = ds.get("optimizer", {}).get("params", {}).get("weight_decay", 0.01)
    groups = param_groups(model, wd)
    names = ckpt_lib.param_group_names(model, groups)
    engine = create_engine(model, groups, ds)
    settings = ckpt_lib.run_settings(engine, 1)
    return ckpt_lib.save(engine, ckpt_dir, 0, {"global_step": 0, "data": None, "rng": None,
                                               "settings": settings,
                                               "param_group_names": names},
                         settings=settings)
