"""The downstream tasks: one module each, and this registry, the only list of their names.

``finetune.py``, ``python -m uniter_fast.infer`` and ``python -m uniter_fast.export`` look a
task up here (:func:`get_task`) and call it; nothing else knows which tasks exist.  Adding
a task is one module with a :class:`~uniter_fast.tasks.base.FinetuneTask` and one line
below (see the fine-tuning docs, "Adding a task").
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Tuple, Type

from .base import FinetuneTask
from .itm import ItmHnTask, ItmTask
from .nlvr2 import Nlvr2Task
from .re import ReTask
from .vcr import VcrTask
from .ve import VeTask
from .vqa import VqaTask

__all__ = ["TASKS", "FinetuneTask", "get_task", "task_names", "task_from_argv"]

#: task name -> task class
TASKS: Dict[str, Type[FinetuneTask]] = {
    "vqa": VqaTask,
    "ve": VeTask,
    "nlvr2": Nlvr2Task,
    "itm": ItmTask,
    "itm-hn": ItmHnTask,
    "re": ReTask,
    "vcr": VcrTask,
}


def task_names() -> Tuple[str, ...]:
    """The registered task names, in registry order."""
    return tuple(TASKS)


def get_task(name: str) -> FinetuneTask:
    """A new instance of the task ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown fine-tuning task {name!r}; expected one of {task_names()}")
    return TASKS[name]()


def task_from_argv(argv: Optional[List[str]],
                   full_parser: Callable[[], argparse.ArgumentParser]) -> FinetuneTask:
    """The task a command line's ``--task`` names (a command's options depend on it);
    without one, ``full_parser()`` prints the usage (or ``--help``) and exits."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=task_names())
    known, _ = pre.parse_known_args(argv)
    if known.task is None:
        full_parser().parse_args(argv)
        raise SystemExit(2)
    return get_task(known.task)
