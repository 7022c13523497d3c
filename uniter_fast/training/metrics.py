"""``metrics.jsonl`` writer, running means, the progress bar."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

__all__ = ["RunningMean", "MetricsWriter", "progress_bar", "rewind_jsonl"]


class RunningMean:
    """Exponential running mean (UNITER's ``RunningMeter``)."""

    def __init__(self, smooth: float = 0.95):
        self.smooth, self.val = smooth, None

    def __call__(self, x: float) -> None:
        self.val = x if self.val is None else self.smooth * self.val + (1 - self.smooth) * x


class MetricsWriter:
    """One JSON object per line, flushed per record; a no-op off rank 0."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._f = open(path, "a") if path else None

    def __call__(self, rec: Dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)


def rewind_jsonl(path: str, keep: Callable[[Dict[str, Any]], bool]) -> int:
    """Rewrite a JSON-lines file atomically with only the records ``keep`` accepts
    (used on resume: records past the resumed step belong to the interrupted
    run).  Dropped lines -- also a line cut short by a kill -- are appended to
    ``<name>.discarded.jsonl`` next to it.  Returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], []
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and keep(rec)
            except (ValueError, TypeError):
                ok = False
            (kept if ok else dropped).append(line)
    if not dropped:
        return 0
    root, ext = os.path.splitext(path)
    with open(f"{root}.discarded{ext}", "a", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in dropped))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(dropped)
