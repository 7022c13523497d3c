"""train.py on a disk that fills up during a save (fault injection for the tests).

The first ``torch.save`` into the tag directory named by ``$UF_FAULT_FULL_TAG``
writes half of its bytes and then fails the way PyTorch's writer fails on a full
disk (``RuntimeError ... unexpected pos``), or with ``OSError(ENOSPC)`` when
``$UF_FAULT_MODE`` is ``oserror``.  Every other save is untouched.
"""
import errno
import io
import os
import runpy
import sys

import torch

_real_save = torch.save
_TAG = os.environ["UF_FAULT_FULL_TAG"]
_MODE = os.environ.get("UF_FAULT_MODE", "runtime")
_fired = []


def _full_disk_save(obj, f, *args, **kwargs):
    if not _fired and isinstance(f, (str, os.PathLike)) and \
            f"{os.sep}{_TAG}{os.sep}" in os.fspath(f):
        _fired.append(f)
        buf = io.BytesIO()
        _real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as out:            # what a full disk leaves behind
            out.write(data[:len(data) // 2])
        if _MODE == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        raise RuntimeError(f"[enforce fail at inline_container.cc:664] . unexpected pos "
                           f"{len(data) // 2} vs {len(data)}")
    return _real_save(obj, f, *args, **kwargs)


torch.save = _full_disk_save

if __name__ == "__main__":
    train = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(train, run_name="__main__")
