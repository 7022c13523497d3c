"""What every task's inference shares: where the weights come from
(:func:`resolve_checkpoint`), loading them strictly, the run's config with the command
line's overrides, the progress bar, autocast and atomic result files."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .. import checkpoint as ckpt_lib
from ..export import check_keys, consolidate, fill_tied_weights, load_state_dict_file
from ..files import atomic_write
from ..model.model import hidden_size_mismatch
from ..training.config import read_json

__all__ = ["CheckpointSource", "resolve_checkpoint", "load_weights", "load_strict",
           "is_pretraining_state", "load_pretrained_weights", "load_weights_filled",
           "inference_config", "Progress", "amp_dtype", "autocast", "write_json", "db_name", "default_output_dir",
           "claim_outputs", "BOX_RULE_ARGS"]

#: the command-line options of ``infer`` that override the run's config as they are
BOX_RULE_ARGS = ("model_config", "conf_th", "max_bb", "min_bb", "num_bb", "img_dim")


@dataclass(frozen=True)
class CheckpointSource:
    """Where inference reads the weights: ``kind`` ``"deepspeed"`` (``where`` the ``ckpt/``
    directory, ``tag`` the checkpoint, ``run_dir`` the run) or ``"pt"`` (``where`` the file)."""
    kind: str
    where: str
    tag: Optional[str] = None
    run_dir: Optional[str] = None

    @property
    def name(self) -> str:
        """The tag, or the ``.pt`` file's base name: names result files."""
        return self.tag or os.path.splitext(os.path.basename(self.where))[0]


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> CheckpointSource:
    """``--checkpoint``: a run directory, its ``ckpt/``, one ``global_step<N>`` tag
    directory, or a plain state dict file."""
    path = os.path.normpath(path)
    if os.path.isfile(path):
        return CheckpointSource("pt", path)
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, "ckpt")) and not os.path.exists(
            os.path.join(path, ckpt_lib.LATEST)):
        path = os.path.join(path, "ckpt")               # the run directory
    if os.path.exists(os.path.join(path, ckpt_lib.LATEST)) or tag is not None:
        tag = tag or ckpt_lib.read_latest(path)
        if not os.path.isdir(os.path.join(path, tag)):
            raise ValueError(f"--checkpoint {path}: no checkpoint {tag!r}")
        return CheckpointSource("deepspeed", path, tag, os.path.dirname(path))
    if any(f.endswith("model_states.pt") for f in os.listdir(path)):   # one tag directory
        ckpt_dir = os.path.dirname(path)
        return CheckpointSource("deepspeed", ckpt_dir, os.path.basename(path),
                                os.path.dirname(ckpt_dir))
    raise ValueError(f"--checkpoint {path}: neither a .pt file nor a DeepSpeed checkpoint "
                     "directory (no 'latest', no ckpt/, no *model_states.pt)")


def is_pretraining_state(sd: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is the pretraining model's (it has the pretraining heads)."""
    return any(k.startswith(("cls.", "feat_regress.", "region_classifier.")) for k in sd)


def load_pretrained_weights(path: str) -> Dict[str, torch.Tensor]:
    """A training config's ``checkpoint``: a plain state dict file, or a run directory / its
    ``ckpt/`` / a tag directory (consolidated; a pretraining run's with its tied weights)."""
    return load_weights_filled(resolve_checkpoint(path))


def load_weights_filled(source: CheckpointSource) -> Dict[str, torch.Tensor]:
    """:func:`load_weights`, a DeepSpeed checkpoint of the pretraining model with its tied
    weights filled in (consolidated once)."""
    sd = load_weights(source)
    if source.kind == "deepspeed" and is_pretraining_state(sd):
        sd = fill_tied_weights(sd)
    return sd


def load_weights(source: CheckpointSource, fill_tied: bool = False) -> Dict[str, torch.Tensor]:
    """The fp32 state dict of ``source`` (a ``{"module": ...}`` wrapper unwrapped);
    ``fill_tied``: with the pretraining model's tied weights."""
    if source.kind == "deepspeed":
        sd = consolidate(source.where, source.tag, fill_tied=fill_tied)
    else:
        sd = load_state_dict_file(source.where)
        if isinstance(sd, dict) and isinstance(sd.get("module"), dict):
            sd = sd["module"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {source.where} is not a state dict")
    return sd


def load_strict(model: torch.nn.Module, sd: Dict[str, torch.Tensor], where: str,
                cfg: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """``model`` with the weights ``sd`` (every key and shape must match; a checkpoint of
    another model size is named as such)."""
    what = f"checkpoint {where}"
    size = hidden_size_mismatch(sd, model.state_dict())
    if size is not None:
        mc = f"model config {cfg['model_config']}" if cfg and cfg.get("model_config") else \
            "the model config"
        raise ValueError(f"{what}: hidden size {size[0]}, but {mc} has {size[1]} (pass the "
                         "run's training config with --config, or --model_config)")
    if cfg is not None and cfg.get("model_config"):
        what += f" (model config {cfg['model_config']})"
    check_keys(model, sd, f"the weights of {what}", shapes=True, limit=8)
    model.load_state_dict(sd, strict=True)
    return model


def inference_config(args, source: CheckpointSource, task) -> Dict[str, Any]:
    """The run's training config (``--config``, else the run's ``train_config.json``)
    with the command line's model config and box rule, then the task's options."""
    if args.config:
        cfg = read_json(args.config, "training config")
    elif source.run_dir and os.path.exists(os.path.join(source.run_dir, "train_config.json")):
        cfg = read_json(os.path.join(source.run_dir, "train_config.json"), "training config")
    else:
        cfg = {}
    for k in BOX_RULE_ARGS:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if args.compressed_db is not None:
        cfg["compressed_db"] = args.compressed_db
    if not cfg.get("model_config"):
        raise ValueError("no model config: pass --config (the training config) or --model_config")
    task.infer_config(cfg, args)
    task.check_config(cfg)
    return cfg


class Progress:
    """A tqdm bar (rate and remaining time) on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool, unit: str = "pair", desc: str = "scoring"):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, unit_scale=True, dynamic_ncols=True,
                            desc=desc, file=sys.stderr)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``--precision`` (None: fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, precision: str):
    dt = amp_dtype(precision)
    return torch.autocast(device.type, dtype=dt) if dt is not None else contextlib.nullcontext()


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path`` (directories made; written atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(obj))


def default_output_dir(source: CheckpointSource, name: str) -> str:
    """Where a task's result files go without ``--output_dir``: ``<run dir>/<name>``, or
    beside a ``.pt`` file."""
    if source.run_dir:
        return os.path.join(source.run_dir, name)
    return os.path.join(os.path.dirname(os.path.abspath(source.where)), name)


def db_name(path: str) -> str:
    """A db's name for result file names: its directory name without ``.db``."""
    name = os.path.basename(os.path.normpath(path))
    return name[:-3] if name.endswith(".db") else name


def claim_outputs(paths, overwrite: bool) -> None:
    """Before inference runs: none of the result files ``paths`` may exist unless
    ``--overwrite`` (a result is never replaced silently), and none may be a directory."""
    for p in paths:
        if os.path.isdir(p):
            raise ValueError(f"result file {p} is a directory; give a file name (--output)")
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not overwrite:
        raise ValueError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: "
                         "pass --overwrite to replace, or choose another output (--output / "
                         "--output_dir)")
