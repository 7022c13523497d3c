"""The training package shared by pretraining and fine-tuning.

A run is a :class:`~uniter_fast.training.loop.Trainer` driving one
:class:`~uniter_fast.training.task.TrainTask`: the trainer owns everything
that is the same for every task (configs and overrides, distributed setup, the
DeepSpeed engine, the loop, validation scheduling, the metrics file, the
progress bar, checkpoints and resume); a task adds only its model, data, loss,
validation metric and result writer.

* :mod:`.config` -- training config + DeepSpeed config, command-line overrides
  in one table;
* :mod:`.distributed` -- process group, device and thread setup;
* :mod:`.engine` -- parameter groups and ``deepspeed.initialize``;
* :mod:`.metrics` -- ``metrics.jsonl`` writer, running means, progress bar;
* :mod:`.task` -- the interface a task implements;
* :mod:`.loop` -- the trainer;
* :mod:`.pretrain` -- UNITER pretraining (mlm, mrfr, mrc, mrc-kl, itm + WRA);
* :mod:`.synthetic_pretrain` -- the one-time cached pretraining run fine-tuning starts
  from on the synthetic data.

The fine-tuning tasks are :mod:`uniter_fast.tasks` (one module each, above this package).
"""
from .config import OVERRIDES, build_arg_parser, load_configs, read_json
from .distributed import init_distributed
from .engine import param_groups
from .loop import Trainer
from .task import TrainTask

__all__ = ["OVERRIDES", "build_arg_parser", "load_configs", "read_json", "init_distributed",
           "param_groups", "Trainer", "TrainTask"]
