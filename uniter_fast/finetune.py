"""UNITER fine-tuning under DeepSpeed: the driver of every task of the registry
(:mod:`uniter_fast.tasks`).

    deepspeed uniter_fast/finetune.py --task TASK --deepspeed_config ds.json

With no other argument this fine-tunes the tiny UNITER on the built-in
synthetic version of the task (``configs/finetune-<task>-synthetic-tiny.json``),
starting from a pretraining run on the synthetic captions that is made once on
first use and cached under ``$UNITER_FAST_CACHE``.  ``--config`` takes the
original UNITER's training configs (``config/train-vqa-base-4gpu.json``, ...) with
their paths changed; overrides (``--num_train_steps``, ``--output_dir``,
``--lr_mul``, ``--resume``, ...) as for ``train.py``.

Outputs in ``output_dir``: ``ckpt/`` (DeepSpeed checkpoints, ``latest``
written atomically), ``metrics.jsonl``, the validation predictions in the
original's formats, ``train_config.json`` / ``ds_config.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # run as a script (``deepspeed uniter_fast/finetune.py``): import the package from
    # the repository root, not modules of uniter_fast/ as top-level names
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from uniter_fast.tasks import task_from_argv, task_names
from uniter_fast.tasks.base import CLI_OVERRIDES, DESCRIPTION, default_config
from uniter_fast.training import Trainer, build_arg_parser

__all__ = ["main", "build_parser"]


def build_parser(task: str = None) -> argparse.ArgumentParser:
    """The command line of ``finetune.py``; ``--config`` defaults to the task's synthetic one."""
    p = build_arg_parser(DESCRIPTION, default_config(task) if task else None, CLI_OVERRIDES)
    p.add_argument("--task", choices=task_names(), required=True, help="the downstream task")
    return p


def main(argv=None):
    task = task_from_argv(argv, build_parser)
    return Trainer(task, default_config(task.name), DESCRIPTION,
                   parser=build_parser(task.name)).run(argv)


if __name__ == "__main__":
    main()
