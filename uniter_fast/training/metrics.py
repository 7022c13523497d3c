"""``metrics.jsonl`` writer, running means, the progress bar."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

__all__ = ["RunningMean", "MetricsWriter", "progress_bar"]


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
