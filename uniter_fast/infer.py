"""Inference of a fine-tuned UNITER, every task of the registry (:mod:`uniter_fast.tasks`):
the original's result files.

    python -m uniter_fast.infer --task TASK --checkpoint RUN_DIR \
        --txt_db data/txt/vqa_test.db --img_db data/img/coco_test2015 [task options]

``--checkpoint`` is a fine-tuning run's DeepSpeed checkpoint directory (its ``ckpt/``,
the run directory itself, or one ``global_step<N>`` tag directory; any ZeRO stage; the
run's ``train_config.json`` supplies the model config, the box rule, the task's own
settings) or a plain state dict (``.pt``, e.g. from ``python -m uniter_fast.export
to-pt --task ...`` or the original code; give ``--config`` with the training config,
or ``--model_config`` and friends).  What is written, and the task's own options, are
the task's (``--task TASK --help`` lists them): VQA the evaluation server's answers
JSON, VE ``{id: label}``, NLVR2 the ``identifier,True|False`` CSV, retrieval the score
matrix and recalls, RE the predicted boxes, VCR the scores and leaderboard CSV.  A
progress bar shows the rate; when the db has labels the task metric is printed.  One
process; on a GPU machine it runs on the GPU (``--precision`` fp32/bf16/fp16 autocast).
A checkpoint's files pass a safe load (``weights_only`` plus the allow-list of what
DeepSpeed and torch store) before anything unpickles them; ``--trust_checkpoint`` skips
that check for a run you made yourself.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

import torch

from . import checkpoint as ckpt_lib
from .model.compile import add_compile_arguments, compile_counts, compiling, use_compile
from .tasks import FinetuneTask, task_from_argv, task_names
from .tasks.inference import inference_config, resolve_checkpoint

__all__ = ["main", "build_parser", "run_inference"]


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser(task: Optional[FinetuneTask] = None) -> argparse.ArgumentParser:
    """The command line of ``infer``: the shared options plus ``task``'s own."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=task_names(), required=True)
    p.add_argument("--checkpoint", required=True,
                   help="fine-tuning run dir / its ckpt/ / a tag dir, or a plain .pt state dict")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    p.add_argument("--txt_db", required=True, help="text db (UNITER format)")
    p.add_argument("--img_db", required=True,
                   help="image db directory (UNITER format; VCR: 'gt_db;det_db', either or both)")
    p.add_argument("--config", default=None,
                   help="training config (default: the run's train_config.json)")
    p.add_argument("--model_config", default=None)
    p.add_argument("--conf_th", type=float, default=None)
    p.add_argument("--max_bb", type=int, default=None)
    p.add_argument("--min_bb", type=int, default=None)
    p.add_argument("--num_bb", type=int, default=None)
    p.add_argument("--img_dim", type=int, default=None)
    p.add_argument("--compressed_db", default=None, action=argparse.BooleanOptionalAction,
                   help="image db layout (default: whichever exists)")
    p.add_argument("--batch_size", type=_positive_int, default=None,
                   help=task.infer_batch_help if task is not None else "batch size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    add_compile_arguments(p)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load a DeepSpeed checkpoint's files as DeepSpeed does (full "
                        "unpickling) without the safe check: only for a run you made yourself "
                        "whose files hold types outside the allow-list (docs/reliability.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace result files that exist (without it they are never replaced)")
    if task is not None:
        task.add_infer_args(p)
    return p


def run_inference(task: FinetuneTask, args: argparse.Namespace) -> Dict[str, Any]:
    """``task``'s inference as ``args`` says; the summary the command prints."""
    # --trust_checkpoint: for every load of this inference (the tasks load the weights)
    with ckpt_lib.trusting(getattr(args, "trust_checkpoint", False)):
        source = resolve_checkpoint(args.checkpoint, args.tag)
        cfg = inference_config(args, source, task)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not use_compile(getattr(args, "compile", None), device):
            return task.infer(args, cfg, source, device)
        with compiling(backend=getattr(args, "compile_backend", "inductor")):
            summary = task.infer(args, cfg, source, device)
        return dict(summary, compile=compile_counts())


def main(argv=None) -> int:
    task = task_from_argv(argv, build_parser)
    args = build_parser(task).parse_args(argv)
    summary = run_inference(task, args)
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
