"""What ``--resume`` may change: the run's recorded configs against the new ones.

A run's ``train_config.json`` and ``ds_config.json`` record what its steps were trained
with.  On ``--resume`` the new effective configs (as the trainer would write them) are
compared with them before anything of the run directory changes; a difference in a key
that changes what the steps already taken mean (batch size, learning rate, seed, data,
model, optimizer, ...) is refused with every such key listed, old and new, unless
``--allow_config_change``.  Then the old files are kept (``train_config.step<N>.json``,
never overwritten) and the change is logged as a ``config_change`` record of
``metrics.jsonl``.  The keys of :data:`RESUME_FREE_KEYS` (and, in the DeepSpeed config,
:data:`DS_RESUME_FREE_KEYS`) may change freely: extending a run is normal.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Dict, Iterable, Optional

from ..checkpoint import ds_settings
from .config import apply_precision

__all__ = ["RESUME_FREE_KEYS", "DS_RESUME_FREE_KEYS", "RUN_CONFIG_FILES", "ConfigChangeError",
           "config_changes", "check_resume_configs", "keep_old_configs"]

#: training-config keys a resumed run may change freely: how long the run goes on, how
#: often it validates / saves / logs, how many checkpoints it keeps, how the data is loaded
#: (not which data), and where the run directory is (a moved or copied run resumes)
RESUME_FREE_KEYS = frozenset({"num_train_steps", "valid_steps", "save_steps", "log_steps",
                              "keep_checkpoints", "n_workers", "pin_mem", "output_dir"})

#: DeepSpeed-config keys (dotted paths) a resumed run may change freely: the scheduler's
#: step counts the trainer derives from ``num_train_steps`` (a warmup change given in the
#: training config is caught there), and DeepSpeed's own logging
DS_RESUME_FREE_KEYS = frozenset({"scheduler.params.total_num_steps",
                                 "scheduler.params.warmup_num_steps", "steps_per_print",
                                 "wall_clock_breakdown"})

#: the run's config files and the keys of each that may change on resume
RUN_CONFIG_FILES = (("train_config.json", RESUME_FREE_KEYS),
                    ("ds_config.json", DS_RESUME_FREE_KEYS))

_ABSENT = "(absent)"


class ConfigChangeError(ValueError):
    """``--resume`` under a config that changes what the steps taken mean."""


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as dotted keys (lists and scalars as they are)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: Dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_free(key: str, free: Iterable[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in free)


def config_changes(stored: Dict[str, Any], new: Dict[str, Any],
                   free: Iterable[str] = ()) -> Dict[str, list]:
    """``{dotted key: [old, new]}`` of the keys that differ (as JSON holds them; a missing
    key is ``"(absent)"``), the ``free`` ones (and everything under them) left out."""
    a = _flatten(json.loads(json.dumps(stored)))
    b = _flatten(json.loads(json.dumps(new)))
    free = tuple(free)
    return {k: [a.get(k, _ABSENT), b.get(k, _ABSENT)] for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not _is_free(k, free)}


def _canonical_ds(ds: Dict[str, Any]) -> Dict[str, Any]:
    """A DeepSpeed config with the settings the command line can spell several ways
    written one way: the precision sections (``--precision`` adds ``"fp16": {"enabled":
    false}`` where the file had none), the ZeRO stage and gradient accumulation (absent:
    0 and 1).  Precision and stage changes themselves are refused before this compare
    (:func:`uniter_fast.checkpoint.check_settings`)."""
    ds = copy.deepcopy(ds)
    settings = ds_settings(ds, 1)
    apply_precision(ds, settings["precision"])
    ds.setdefault("zero_optimization", {})["stage"] = settings["zero_stage"]
    ds["gradient_accumulation_steps"] = int(ds.get("gradient_accumulation_steps") or 1)
    return ds


def _show(v: Any) -> str:
    s = v if v == _ABSENT else json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _suffix(tag: str) -> str:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return f"step{m.group(1)}" if m else tag


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_resume_configs(out_dir: str, configs: Dict[str, Dict[str, Any]], tag: str,
                         allow: bool = False) -> Dict[str, Dict[str, list]]:
    """Compare the new ``configs`` (``{file name: config}``, e.g. ``train_config.json``)
    with the run's files; ``{file: {key: [old, new]}}`` of the changes that are not free
    (``{}``: none).  Raises :class:`ConfigChangeError` listing them unless ``allow``.  A file
    the run lacks (a checkpoint made by ``export from-pt``, an older run) is not compared;
    an unreadable one is compared as empty."""
    changes: Dict[str, Dict[str, list]] = {}
    for name, free in RUN_CONFIG_FILES:
        path = os.path.join(out_dir, name)
        if name not in configs or not os.path.exists(path):
            continue
        old, new = _read(path) or {}, configs[name]
        if name == "ds_config.json":
            old, new = _canonical_ds(old), _canonical_ds(new)
        diff = config_changes(old, new, free)
        if diff:
            changes[name] = diff
    if changes and not allow:
        listed = "; ".join(f"{name}: " + ", ".join(f"{k} {_show(o)} -> {_show(n)}"
                                                   for k, (o, n) in diff.items())
                           for name, diff in changes.items())
        kept = ", ".join(f"{n[:-5]}.{_suffix(tag)}.json" for n in changes)
        raise ConfigChangeError(
            f"--resume from {tag}: the settings differ from those the run in {out_dir} was "
            f"trained with ({listed}). Resuming under them would change what the steps taken "
            f"so far mean. Resume with the run's settings (its {', '.join(changes)} hold "
            f"them), or pass --allow_config_change to continue with the new ones (the old "
            f"files are then kept as {kept} and the change is logged in metrics.jsonl). "
            f"Free to change on resume: {', '.join(sorted(RESUME_FREE_KEYS))}.")
    return changes


def keep_old_configs(out_dir: str, changes: Dict[str, Dict[str, list]], tag: str
                     ) -> Dict[str, str]:
    """Rename each changed config file of the run to ``<name>.<step N>.json`` (a new name
    when that exists: nothing is overwritten) before the new one is written;
    ``{file: kept as}``."""
    kept = {}
    for name in changes:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        base, n = f"{name[:-5]}.{_suffix(tag)}", 1
        dst = f"{base}.json"
        while os.path.exists(os.path.join(out_dir, dst)):
            n += 1
            dst = f"{base}.{n}.json"
        os.replace(path, os.path.join(out_dir, dst))
        kept[name] = dst
    return kept
