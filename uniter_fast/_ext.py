"""Loading of the C++/CUDA extension (``csrc/``).

``cpu_module()`` returns a module with ``ipot_cpu``; ``cuda_module()`` one
with ``ipot_cuda``.  Both prefer the extension built by ``setup.py``
(``uniter_fast._C``); otherwise they JIT-compile ``csrc/`` with
:func:`torch.utils.cpp_extension.load` into a cache directory
(``$UNITER_FAST_EXT_DIR``, else ``.torch_extensions/`` in the source
checkout, else ``~/.cache/uniter_fast/torch_extensions``).  Failures raise
:class:`ExtensionUnavailableError` with the build error; they are cached so a
broken toolchain costs one attempt per process.
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import threading

__all__ = ["ExtensionUnavailableError", "cpu_module", "cuda_module", "csrc_dir",
           "cpu_unavailable_reason", "cuda_unavailable_reason"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PKG_DIR)
_lock = threading.Lock()


class ExtensionUnavailableError(RuntimeError):
    """The C++/CUDA extension is neither prebuilt nor buildable here."""


def csrc_dir() -> str:
    return os.path.join(_REPO_DIR, "csrc")


def _build_dir(name: str) -> str:
    root = os.environ.get("UNITER_FAST_EXT_DIR")
    if not root:
        root = os.path.join(_REPO_DIR, ".torch_extensions")
        if not (os.path.isdir(csrc_dir()) and os.access(_REPO_DIR, os.W_OK)):
            root = os.path.join(os.path.expanduser("~"), ".cache", "uniter_fast",
                                "torch_extensions")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _prebuilt():
    if os.environ.get("UNITER_FAST_NO_PREBUILT") == "1":
        return None
    try:
        return importlib.import_module("uniter_fast._C")
    except ImportError:
        return None


_CPU_FLAGS = ["-O3", "-fopenmp"]


def _jit(name: str, with_cuda: bool):
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    if not sources:
        raise ExtensionUnavailableError(
            f"no prebuilt uniter_fast._C and no C++ sources at {src} to JIT-compile")
    kwargs = dict(extra_cflags=list(_CPU_FLAGS), extra_ldflags=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src, "*.cu")))
        kwargs["extra_cflags"].append("-DUNITER_FAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "-DUNITER_FAST_WITH_CUDA"]
    try:
        return cpp_extension.load(name=name, sources=sources, build_directory=_build_dir(name),
                                  with_cuda=with_cuda, verbose=False, **kwargs)
    except Exception as e:  # compiler missing, build error, ...
        raise ExtensionUnavailableError(
            f"could not JIT-compile the uniter_fast extension ({name}) from {src}: "
            f"{type(e).__name__}: {e}") from e


_cache: dict = {}


def _load(key: str, factory):
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = (factory(), None)
            except ExtensionUnavailableError as e:
                _cache[key] = (None, e)
        mod, err = _cache[key]
    if err is not None:
        raise err
    return mod


def cpu_module():
    """Module with ``ipot_cpu`` (prebuilt ``uniter_fast._C``, else JIT)."""
    def factory():
        mod = _prebuilt()
        return mod if mod is not None else _jit("uniter_fast_C", with_cuda=False)
    return _load("cpu", factory)


def cuda_module():
    """Module with ``ipot_cuda`` (prebuilt with CUDA, else JIT with nvcc)."""
    def factory():
        import torch
        from torch.utils import cpp_extension

        mod = _prebuilt()
        if mod is not None and getattr(mod, "has_cuda", False):
            return mod
        if not torch.cuda.is_available():
            raise ExtensionUnavailableError("CUDA is not available")
        if cpp_extension.CUDA_HOME is None:
            raise ExtensionUnavailableError("no CUDA toolkit (CUDA_HOME) to compile csrc/*.cu")
        return _jit("uniter_fast_C_cuda", with_cuda=True)
    return _load("cuda", factory)


def cpu_unavailable_reason():
    try:
        cpu_module()
    except ExtensionUnavailableError as e:
        return str(e)
    return None


def cuda_unavailable_reason():
    try:
        cuda_module()
    except ExtensionUnavailableError as e:
        return str(e)
    return None
