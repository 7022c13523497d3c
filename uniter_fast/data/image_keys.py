"""Image files and the keys UNITER's image db stores them under.

UNITER names an image's record after the feature file the original extraction wrote for it:
a prefix, the image file's stem and ``.npz`` (``nlvr2_<stem>.npz``,
``coco_train2014_000000000009.npz``); the folder is not part of the name.
:func:`list_images` turns a folder (walked recursively) or a list file into ``(path, key)``
pairs and refuses two images that would share a key.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from ..detector.image import IMAGE_EXTENSIONS

__all__ = ["ImageListError", "image_key", "list_images", "IMAGE_EXTENSIONS", "MAX_KEY_BYTES"]

#: LMDB's longest key (its default build)
MAX_KEY_BYTES = 511


class ImageListError(ValueError):
    """The images to extract cannot be listed (the message names the source and why)."""


def image_key(path: str, prefix: str = "") -> str:
    """UNITER's image key of ``path``: ``prefix`` + the file's stem + ``.npz`` (the base
    name only: ``a/b/x.jpg`` -> ``x.npz``)."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    if not stem:
        raise ImageListError(f"{path}: no file name to make an image key of")
    key = f"{prefix}{stem}.npz"
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        raise ImageListError(f"{path}: image key {key[:60]!r}... is longer than LMDB's "
                             f"{MAX_KEY_BYTES}-byte key limit")
    return key


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: str) -> List[str]:
    out = []
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in sorted(files) if _is_image_name(f))
    return sorted(out)


def _read_list(list_file: str) -> List[str]:
    if _is_image_name(list_file):
        raise ImageListError(f"images {list_file}: is an image file; give a folder of images "
                             "or a text file listing one image path per line")
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ImageListError(f"images {list_file}: not a text file (expected a folder of "
                             "images or a UTF-8 list of image paths, one per line)") from None
    except OSError as e:
        raise ImageListError(f"images {list_file}: cannot be read "
                             f"({e.strerror or e})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line if os.path.isabs(line) else os.path.normpath(os.path.join(base, line)))
    return out


def list_images(src: str, prefix: str = "") -> List[Tuple[str, str]]:
    """``(path, key)`` of every image of ``src``: a folder (walked recursively, sorted, files
    whose lower-case suffix is one of :data:`IMAGE_EXTENSIONS`) or a text file listing one
    image path per line (relative to the list file's folder; blank lines and ``#`` comments
    skipped; listed files are not opened here, so a missing one fails at extraction).
    Two images with one key, a missing ``src`` or an empty listing raise
    :class:`ImageListError`."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise ImageListError(f"images {src}: no such file or folder (expected a folder of "
                             "images or a text file listing image paths)")
    if os.path.isdir(src):
        paths = _walk(src)
        if not paths:
            raise ImageListError(f"images {src}: no image files in the folder (looked for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}, any case, in subfolders too)")
    else:
        paths = _read_list(src)
        if not paths:
            raise ImageListError(f"images {src}: the list holds no image paths (blank lines "
                                 "and # comments are skipped)")
    seen = {}
    out = []
    for p in paths:
        key = image_key(p, prefix)
        if key in seen:
            if os.path.normpath(seen[key]) == os.path.normpath(p):
                raise ImageListError(f"images {src}: {p} is listed twice")
            raise ImageListError(f"images {src}: {seen[key]} and {p} have the same image key "
                                 f"{key!r} (UNITER keys an image by its file stem); rename "
                                 "one, or extract them into separate dbs with --prefix")
        seen[key] = p
        out.append((p, key))
    return out
