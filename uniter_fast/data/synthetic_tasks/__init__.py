"""Synthetic fine-tuning data on the synthetic grounded world: one generator module per
task (named after its data, e.g. :mod:`.vqa`), the shared machinery in :mod:`.base` (see
its docstring for what a generator module has).

Use: ``paths = ensure_task_dbs(gen, make_spec(gen, cfg.get("synthetic_task")), world)``
with ``gen`` a generator module (``from uniter_fast.data.synthetic_tasks import vqa``):
``{"root": ..., part: path for part in gen.PARTS}``, generated on first use.
"""
from .base import (
    EXTRA_WORDS,
    GT_NUM_BB,
    MODIFIERS,
    SPLITS,
    TaskSpec,
    ensure_task_dbs,
    generate_task_dbs,
    make_spec,
    task_vocab,
)

__all__ = ["TaskSpec", "make_spec", "ensure_task_dbs", "generate_task_dbs", "task_vocab",
           "MODIFIERS", "EXTRA_WORDS", "GT_NUM_BB", "SPLITS"]
