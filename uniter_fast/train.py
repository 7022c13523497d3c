"""UNITER pretraining under DeepSpeed.

    deepspeed uniter_fast/train.py --deepspeed_config ds.json

With no other argument this pretrains the tiny UNITER on the built-in
synthetic grounded dataset with all tasks (mlm, mrfr, mrc-kl, itm + WRA),
using the packaged ``configs/pretrain-synthetic-tiny.json``.  Other settings
come from a UNITER-style training config (``--config path.json``) plus
overrides (``--num_train_steps``, ``--output_dir``, ``--resume``, ...).

Outputs in ``output_dir``: ``ckpt/`` (DeepSpeed checkpoints; ``latest`` is
written atomically), ``metrics.jsonl`` (one JSON object per step and per
validation), ``train_config.json`` / ``ds_config.json`` (what was run).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # run as a script (``deepspeed uniter_fast/train.py``): import the package from
    # the repository root, not modules of uniter_fast/ as top-level names
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

# The implementation lives in uniter_fast.training (shared with fine-tuning); these
# names stay importable from here for scripts written against earlier versions.
from uniter_fast.constants import IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data import text_meta
from uniter_fast.training import build_arg_parser as _build_arg_parser
from uniter_fast.training import init_distributed, load_configs, param_groups
from uniter_fast.training.pretrain import (
    DEFAULT_CONFIG,
    DESCRIPTION,
    build_model,
    compute_loss,
    main,
)

__all__ = ["main", "build_arg_parser", "load_configs", "init_distributed", "text_meta",
           "build_model", "param_groups", "compute_loss", "DEFAULT_CONFIG", "IMG_DIM",
           "IMG_LABEL_DIM"]


def build_arg_parser():
    """The command line of ``train.py`` (pretraining)."""
    return _build_arg_parser(DESCRIPTION, DEFAULT_CONFIG)


if __name__ == "__main__":
    main()
