"""``python -m uniter_fast.export``: convert between DeepSpeed checkpoints and plain UNITER
state dicts.

    python -m uniter_fast.export to-pt OUTPUT_DIR/ckpt model.pt [--tag global_step400] [--task TASK]
    python -m uniter_fast.export from-pt model.pt NEW_OUTPUT_DIR/ckpt \
        [--config train.json] [--deepspeed_config ds.json] [--task TASK]

``to-pt`` writes an fp32 ``state_dict`` with exactly the original UNITER key names: for
the pretraining model (``--task pretrain``, the default) both tied weights present; for
a fine-tuning task (any task of the registry) exactly the task model's keys, checked
against the run's ``train_config.json`` (the original's ``UniterForVisualQuestionAnswering``
etc. load it with ``strict=True``).  ``from-pt`` builds a single-process DeepSpeed
checkpoint (tag ``global_step0``) from a state dict: the pretraining model from
``--config`` as ``train.py`` does (continue with ``train.py --resume`` at world size 1),
or the task model as ``finetune.py`` does (continue with ``finetune.py --resume``).  To
start multi-rank training from a .pt file, set the training config's ``checkpoint``
instead (UNITER's way).

Nothing is unpickled that could run code: every file of the tag passes a safe load
(``weights_only`` plus the allow-list of what DeepSpeed and torch store) before ``to-pt``
reads it, unless ``--trust_checkpoint`` (a run you made yourself); ``from-pt`` reads the
``.pt`` file with the same safe load, always.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..tasks import FinetuneTask, get_task, task_names
from ..tasks.base import task_checkpoint_from_state_dict
from ..training.pretrain import checkpoint_from_state_dict
from . import to_pt

#: ``--task`` of the pretraining model (every other value names a fine-tuning task)
PRETRAINING_MODEL = "pretrain"


def _task(name: str) -> Optional[FinetuneTask]:
    """The fine-tuning task ``name``, or None for the pretraining model."""
    return None if name == PRETRAINING_MODEL else get_task(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    models = (PRETRAINING_MODEL,) + task_names()
    a = sub.add_parser("to-pt", help="DeepSpeed checkpoint dir -> plain state dict (.pt)")
    a.add_argument("ckpt_dir")
    a.add_argument("out")
    a.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    a.add_argument("--allow_module_weights", action="store_true",
                   help="export the bf16/fp16 module weights when the fp32 masters are missing "
                        "(lossy; without it such a tag is refused)")
    a.add_argument("--task", choices=models, default=PRETRAINING_MODEL,
                   help="the model the checkpoint holds (fine-tuning: its own keys, no "
                        "pretraining tied weights)")
    a.add_argument("--trust_checkpoint", action="store_true",
                   help="load the checkpoint's files as DeepSpeed does (full unpickling) "
                        "without the safe check: only for a run you made yourself whose "
                        "files hold types outside the allow-list (see docs/reliability.md)")
    b = sub.add_parser("from-pt", help="plain state dict (.pt) -> DeepSpeed checkpoint dir")
    b.add_argument("--task", choices=models, default=PRETRAINING_MODEL,
                   help="the model to build (fine-tuning tasks: from --config, default the "
                        "task's synthetic config)")
    b.add_argument("pt")
    b.add_argument("ckpt_dir")
    b.add_argument("--config", default=None, help="training config (model_config etc.)")
    b.add_argument("--deepspeed_config", default=None)
    args = p.parse_args(argv)
    task = _task(args.task)
    if args.cmd == "to-pt":
        check = None if task is None else (lambda sd: task.check_state_dict(sd, args.ckpt_dir))
        sd = to_pt(args.ckpt_dir, args.out, args.tag, args.allow_module_weights,
                   fill_tied=task is None, check=check, trust=args.trust_checkpoint)
        print(f"wrote {args.out}: {len(sd)} tensors, "
              f"{sum(v.numel() for v in sd.values())} values")
    else:
        if task is None:
            tag = checkpoint_from_state_dict(args.pt, args.ckpt_dir, args.config,
                                             args.deepspeed_config)
        else:
            tag = task_checkpoint_from_state_dict(task, args.pt, args.ckpt_dir, args.config,
                                                  args.deepspeed_config)
        print(f"wrote {args.ckpt_dir}/{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
