"""What a task adds to the shared trainer.

A task is a small object; the trainer calls, in order::

    task.configure(cfg, ds_config, args)         # adjust the loaded configs (every rank)
    task.prepare_data(cfg, rank)                 # rank 0 first (e.g. generate synthetic dbs)
    meta = task.data_meta(cfg)
    loader = task.train_loader(cfg, rank, world, accum)   # .next() -> (name, batch),
                                                          # .state_dict(), .load_state_dict()
    vals = task.val_loaders(cfg, rank, world)             # {name: loader with epoch_batches()}
    model = task.build_model(cfg, meta)
    groups = task.param_groups(model, cfg, ds_config)
    loss, extra = task.compute_loss(engine, name, batch, cfg)   # per step
    logs = task.validate(engine, vals, ctx)                     # {"<name>/<metric>": value}
    task.end_of_run(engine, ctx, summary)                       # e.g. write a result file
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch

from .engine import param_groups as _param_groups

__all__ = ["TrainTask", "RunContext"]


@dataclass
class RunContext:
    """What a task's validation / end-of-run hooks may need from the trainer."""
    device: torch.device
    rank: int
    world_size: int
    zero_stage: int
    output_dir: str
    cfg: Dict[str, Any]
    #: the optimizer step of the current validation / end of run
    step: int = 0


class TrainTask:
    #: shown on the progress bar and in the ``start`` record
    name: str = "task"
    #: training-config keys that must be present
    required_keys: Tuple[str, ...] = ("output_dir", "num_train_steps", "train_batch_size",
                                      "train_datasets", "model_config")
    #: every training-config key the task reads (the trainer's own keys,
    #: ``config.TRAINER_KEYS``, and the command-line overrides are added); other keys
    #: are reported as unknown (a warning; ``--strict_config``: an error).  None: the
    #: task does not declare its keys and nothing is checked.
    known_keys: Optional[FrozenSet[str]] = None

    def configure(self, cfg: Dict[str, Any], ds_config: Dict[str, Any], args) -> None:
        """Adjust the loaded training and DeepSpeed configs in place, before anything
        reads them (task-specific command-line options in ``args``, key aliases of the
        original scripts' configs).  Runs on every rank."""

    def prepare_data(self, cfg: Dict[str, Any], rank: int) -> None:
        """Run on rank 0 before the other ranks touch the data (one-time generation)."""

    def data_meta(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    def train_loader(self, cfg, rank: int, world_size: int, accum_steps: int):
        raise NotImplementedError

    def val_loaders(self, cfg, rank: int, world_size: int) -> Dict[str, Any]:
        return {}

    def build_model(self, cfg: Dict[str, Any], meta: Dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model, cfg: Dict[str, Any], ds_config: Dict[str, Any]):
        wd = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.01)
        return _param_groups(model, wd)

    def compute_loss(self, engine, name: str, batch: Dict[str, Any], cfg: Dict[str, Any]
                     ) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError

    def check_batch(self, name: str, batch: Dict[str, Any]) -> None:
        """Raise on a batch that would silently corrupt training (default: finite features)."""
        for k in ("img_feat", "img_pos_feat", "feat_targets", "label_targets"):
            v = batch.get(k)
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"{name}: batch {k} contains NaN or inf")

    def batch_size(self, batch: Dict[str, Any]) -> Tuple[int, int]:
        """(tokens, examples) of a batch, for throughput logs."""
        return int(batch["attn_masks"].sum()), int(batch["input_ids"].size(0))

    def validate(self, engine, val_loaders: Dict[str, Any], ctx: RunContext) -> Dict[str, float]:
        return {}

    def end_of_run(self, engine, ctx: RunContext, summary: Dict[str, Any]) -> None:
        """Called on every rank after the last step (e.g. to write result files)."""
