"""Writing result files so that a reader never sees a part of one."""
from __future__ import annotations

import os
from typing import Union

__all__ = ["atomic_write"]


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text or bytes) to the file ``path`` through a temporary file beside it
    and a rename: ``path`` is the old file or the new one, never a part (the temporary file
    is removed if anything fails)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
