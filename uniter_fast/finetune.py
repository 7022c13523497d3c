"""UNITER fine-tuning (VQA, VE, NLVR2) under DeepSpeed.

    deepspeed uniter_fast/finetune.py --task {vqa,ve,nlvr2} --deepspeed_config ds.json

With no other argument this fine-tunes the tiny UNITER on the built-in
synthetic version of the task (``configs/finetune-<task>-synthetic-tiny.json``),
starting from a pretraining run on the synthetic captions that is made once on
first use and cached under ``$UNITER_FAST_CACHE``.  ``--config`` takes the
original UNITER's training configs (``config/train-vqa-base-4gpu.json``,
``train-ve-base-2gpu.json``, ``train-nlvr2-base-1gpu.json``) with their paths
changed; overrides (``--num_train_steps``, ``--output_dir``, ``--lr_mul``,
``--resume``, ...) as for ``train.py``.

Outputs in ``output_dir``: ``ckpt/`` (DeepSpeed checkpoints, ``latest``
written atomically; VQA also ``ans2label.json``), ``metrics.jsonl``,
``results/`` (the validation predictions of every validation, in the original's
formats), ``train_config.json`` / ``ds_config.json``.
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

from uniter_fast.training import Trainer, build_arg_parser
from uniter_fast.training.finetune import (
    CLI_OVERRIDES,
    DESCRIPTION,
    TASK_NAMES,
    default_config,
    make_task,
)

__all__ = ["main", "build_parser"]


def build_parser(task: str = None) -> argparse.ArgumentParser:
    """The command line of ``finetune.py``; ``--config`` defaults to the task's synthetic one."""
    p = build_arg_parser(DESCRIPTION, default_config(task) if task else None, CLI_OVERRIDES)
    p.add_argument("--task", choices=TASK_NAMES, required=True, help="the downstream task")
    return p


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=TASK_NAMES)
    known, _ = pre.parse_known_args(argv)
    if known.task is None:              # let the full parser print usage / --help
        build_parser().parse_args(argv)
        raise SystemExit(2)
    return Trainer(make_task(known.task), default_config(known.task), DESCRIPTION,
                   parser=build_parser(known.task)).run(argv)


if __name__ == "__main__":
    main()
