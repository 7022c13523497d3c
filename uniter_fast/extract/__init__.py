"""Images to UNITER's image db: the bottom-up-attention detector over a folder or a list of
images, written as the db that :func:`uniter_fast.data.db.open_img_db` (and so training,
fine-tuning and inference) reads.  ``python -m uniter_fast.extract`` is the command line
(:mod:`uniter_fast.extract.__main__`); :func:`extract` is the same as a function.

The output directory ``OUT`` holds, as UNITER's ``scripts/convert_imgdir.py`` writes them:

* ``feat_th{conf_th}_max{max_bb}_min{min_bb}_compressed/`` (or ``feat_numbb{num_bb}_compressed/``
  for a fixed box count): an LMDB, one record per image key (:mod:`uniter_fast.data.image_keys`:
  prefix + file stem + ``.npz``) holding ``np.savez_compressed`` bytes of the record's arrays
  (``features``, ``norm_bb``, ``conf``, ``soft_labels``, ``obj_ids``, ``attr_ids``, ``boxes``;
  float32 stored as float16, integers as they are) cut by UNITER's box rule, and
  ``__keys__`` (a JSON list of the keys);
* ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` (key -> box count; not for a fixed count);

and, for this tool: ``extract_settings.json`` (the run's settings: weights file name and size,
preset and image sizes, box rule, prefix, precision), ``failed.tsv`` (path, key, reason of
every image that could not be extracted; absent when none failed) and, while a run is under
way, ``extract_shards/rank{r}/`` (one LMDB per rank).

How a run goes: every rank (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` of ``torchrun`` or
``deepspeed``; one process is world 1) takes ``[rank::world]`` of the image list sorted by
key, reads and preprocesses images in DataLoader workers, keeps a window of them, sorts it
by aspect ratio and runs ``batch_size`` images per padded forward; each batch's records are
committed to the rank's shard LMDB when the batch is done.  When every rank is done
(a gloo barrier; a rank that died is reported, a rank that does not arrive within
``wait_timeout`` too), rank 0 copies the shards into the db, writes the box counts,
``__keys__`` last, and removes the shards.  Killed at any point, a rerun skips the images
already committed (in a shard or in the db) and loses nothing; images that failed are
retried.  A finished db (``__keys__`` written) is never rewritten: a rerun with the same
image list says it is complete (or retries the images that failed, adding those that now
succeed); another image list or other settings are refused unless ``overwrite``.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import lmdb
import numpy as np
import torch

from ..constants import DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB
from ..data.db import DbError, check_lmdb_file, img_db_name, nbb_file_name
from ..data.image_keys import ImageListError, list_images
from ..detector.config import PRESETS, DetectorConfig
from ..detector.extractor import PRECISIONS, Extractor, aspect_batches
from ..detector.image import ImageError, PreparedImage, load_image, prepare
from ..detector.weights import WeightsError, find_weights_file, load_detector
from ..files import atomic_write

__all__ = ["ExtractError", "RankWaitError", "WeightsError", "ExtractOptions", "Summary", "extract",
           "make_extractor", "detector_config", "run_settings", "encode_record", "record_boxes",
           "check_box_rule", "Layout", "prepare_output", "committed_keys", "merge",
           "read_failed", "write_failed", "ImageFiles", "RankResult", "extract_rank", "dist_env",
           "SETTINGS_FILE", "FAILED_FILE", "SHARDS_DIR", "KEYS_KEY"]

SETTINGS_FILE = "extract_settings.json"
FAILED_FILE = "failed.tsv"
SHARDS_DIR = "extract_shards"
KEYS_KEY = b"__keys__"
#: address space of an LMDB (sparse: the file grows only as written; UNITER uses 1 TiB)
MAP_SIZE = 1 << 40
#: images kept from the loader and sorted by aspect ratio, per image of a batch
WINDOW_PER_BATCH = 8
#: records and bytes per transaction when the shards are copied into the db
MERGE_RECORDS, MERGE_BYTES = 2000, 256 << 20
#: seconds between progress lines when the bar is off
LOG_EVERY_S = 60.0
#: seconds the ranks wait for each other to start (and for rank 0's look at the output)
JOIN_TIMEOUT_S = 1800
#: the record fields that are not arrays (left out of the db, as UNITER's records)
_NOT_STORED = ("height", "width")


class ExtractError(RuntimeError):
    """A run that cannot go on (the message says what, where, and what to do)."""


class RankWaitError(ExtractError):
    """A rank died or did not finish in time (the committed images are kept)."""


# --------------------------------------------------------------------------- options


@dataclass
class ExtractOptions:
    """What :func:`extract` does (the command line's options)."""
    detector: str
    images: str
    out: str
    preset: str = "uniter"
    conf_th: float = DEFAULT_CONF_TH
    max_bb: int = DEFAULT_MAX_BB
    min_bb: int = DEFAULT_MIN_BB
    #: a fixed box count (UNITER's ``conf_th = -1``); None: the confidence rule
    num_bb: Optional[int] = None
    prefix: str = ""
    batch_size: int = 2
    precision: str = "fp32"
    #: None: ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``
    device: Optional[str] = None
    workers: int = 2
    overwrite: bool = False
    progress: bool = True
    #: the preset's image sizes overridden (tests, small images)
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    #: seconds rank 0 waits for the other ranks to finish
    wait_timeout: float = 6 * 3600.0


def check_box_rule(conf_th: float, max_bb: int, min_bb: int, num_bb: Optional[int]) -> None:
    """UNITER's box rule: ``0 <= conf_th <= 1``, ``1 <= min_bb <= max_bb``; or a fixed
    ``num_bb >= 1``.  Raises :class:`ExtractError`."""
    if num_bb is not None:
        if int(num_bb) < 1:
            raise ExtractError(f"--num_bb must be >= 1 (boxes per image), got {num_bb}")
        return
    if conf_th == -1:
        raise ExtractError("--conf_th -1 is UNITER's fixed box count: give --num_bb N instead")
    if not 0.0 <= float(conf_th) <= 1.0:
        raise ExtractError(f"--conf_th must be a confidence in [0, 1], got {conf_th}")
    if int(max_bb) < 1:
        raise ExtractError(f"--max_bb must be >= 1, got {max_bb}")
    if not 1 <= int(min_bb) <= int(max_bb):
        raise ExtractError(f"--min_bb must be in [1, max_bb={max_bb}], got {min_bb}")


def _check_options(o: ExtractOptions) -> None:
    check_box_rule(o.conf_th, o.max_bb, o.min_bb, o.num_bb)
    if o.preset not in PRESETS:
        raise ExtractError(f"--preset must be one of {sorted(PRESETS)}, got {o.preset!r}")
    if o.precision not in PRECISIONS:
        raise ExtractError(f"--precision must be one of {sorted(PRECISIONS)}, "
                           f"got {o.precision!r}")
    if o.batch_size < 1:
        raise ExtractError(f"--batch_size must be >= 1 (images per forward), got {o.batch_size}")
    if o.workers < 0:
        raise ExtractError(f"--workers must be >= 0, got {o.workers}")
    for name in ("min_size", "max_size"):
        v = getattr(o, name)
        if v is not None and v < 1:
            raise ExtractError(f"--{name} must be >= 1 (pixels), got {v}")
    if "\t" in o.prefix or "\n" in o.prefix or "/" in o.prefix:
        raise ExtractError(f"--prefix must not hold a tab, newline or '/', got {o.prefix!r}")
    if o.wait_timeout <= 0:
        raise ExtractError(f"--wait_timeout must be > 0 seconds, got {o.wait_timeout}")


def detector_config(preset: str, min_size: Optional[int] = None,
                    max_size: Optional[int] = None) -> DetectorConfig:
    """The test-time settings of ``preset``, image sizes overridden where given."""
    cfg = DetectorConfig().with_preset(preset)
    changes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size))
               if v is not None}
    try:
        return cfg.replace(**changes) if changes else cfg
    except ValueError as e:
        raise ExtractError(f"--min_size/--max_size: {e}") from None


def make_extractor(detector: str, preset: str = "uniter", *, min_size: Optional[int] = None,
                   max_size: Optional[int] = None, **kwargs: Any) -> Extractor:
    """The :class:`~uniter_fast.detector.Extractor` a run uses (``kwargs``: device,
    precision, box rule)."""
    return Extractor(load_detector(detector, detector_config(preset, min_size, max_size)),
                     **kwargs)


def run_settings(o: ExtractOptions, weights_file: str) -> Dict[str, Any]:
    """What must stay the same between a run and its resumption (``extract_settings.json``)."""
    cfg = detector_config(o.preset, o.min_size, o.max_size)
    fixed = o.num_bb is not None
    return {
        "weights_file": os.path.basename(weights_file),
        "weights_size": os.path.getsize(weights_file),
        "preset": o.preset,
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "conf_th": -1 if fixed else float(o.conf_th),
        "max_bb": None if fixed else int(o.max_bb),
        "min_bb": None if fixed else int(o.min_bb),
        "num_bb": int(o.num_bb) if fixed else None,
        "prefix": o.prefix,
        "precision": o.precision,
    }


def _db_name(o: ExtractOptions) -> str:
    if o.num_bb is not None:
        return img_db_name(-1, 0, 0, int(o.num_bb), True)
    return img_db_name(float(o.conf_th), int(o.max_bb), int(o.min_bb), 0, True)


# --------------------------------------------------------------------------- records


def encode_record(rec: Dict[str, Any]) -> Tuple[bytes, int]:
    """The db value of an Extractor record (its arrays; float32 as float16, integers as
    they are; ``height``/``width`` left out as in UNITER's records) and its box count.
    Raises :class:`ValueError` for a record the readers would refuse (no boxes, values
    that do not fit float16)."""
    arrays = {}
    for k, v in rec.items():
        if k in _NOT_STORED:
            continue
        a = np.asarray(v)
        if a.dtype == np.float32 or a.dtype == np.float64:
            with np.errstate(over="ignore"):
                a = a.astype(np.float16)
            if not np.isfinite(a).all():
                raise ValueError(f"{k} holds values float16 cannot store (NaN, inf or "
                                 "beyond +-65504)")
        arrays[k] = a
    n = int(arrays["conf"].shape[0]) if "conf" in arrays else 0
    if n == 0:
        raise ValueError("no boxes (the detector found no region in the image)")
    with io.BytesIO() as w:
        np.savez_compressed(w, **arrays)
        return w.getvalue(), n


def record_boxes(value: bytes) -> int:
    """The box count of a stored record (rows of its ``conf``)."""
    with io.BytesIO(value) as r, np.load(r, allow_pickle=False) as npz:
        return int(npz["conf"].shape[0])


# --------------------------------------------------------------------------- layout


class Layout:
    """The files of an output directory."""

    def __init__(self, out: str, db_name: str, nbb_name: Optional[str]):
        self.out = out
        self.db_name = db_name
        self.db = os.path.join(out, db_name)
        self.nbb = os.path.join(out, nbb_name) if nbb_name else None
        self.settings = os.path.join(out, SETTINGS_FILE)
        self.failed = os.path.join(out, FAILED_FILE)
        self.shards = os.path.join(out, SHARDS_DIR)

    @classmethod
    def of(cls, o: ExtractOptions) -> "Layout":
        nbb = (None if o.num_bb is not None
               else nbb_file_name(float(o.conf_th), int(o.max_bb), int(o.min_bb)))
        return cls(o.out, _db_name(o), nbb)

    def shard(self, rank: int) -> str:
        return os.path.join(self.shards, f"rank{rank}")

    def shard_dirs(self) -> List[str]:
        if not os.path.isdir(self.shards):
            return []
        return [os.path.join(self.shards, n) for n in sorted(os.listdir(self.shards))
                if os.path.isdir(os.path.join(self.shards, n))]


def _open_read(path: str, what: str):
    """A read-only LMDB environment (with LMDB's locking: other ranks may be writing
    their shards), checked for truncation first."""
    try:
        check_lmdb_file(path, what)
    except DbError as e:
        raise ExtractError(f"{e}; remove it (its images are extracted again) or use "
                           "--overwrite") from None
    try:
        return lmdb.open(path, readonly=True, create=False, lock=True, readahead=False,
                         max_readers=1024, map_size=MAP_SIZE)
    except lmdb.Error as e:
        raise ExtractError(f"{what} {path}: cannot be opened ({e})") from None


def _keys_of(path: str, what: str) -> Tuple[Set[str], Optional[List[str]]]:
    """The record keys of an LMDB (``__keys__`` left out) and its ``__keys__`` list (None
    when not written)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return set(), None
    env = _open_read(path, what)
    try:
        with env.begin() as txn:
            keys = {k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)
                    if k != KEYS_KEY}
            raw = txn.get(KEYS_KEY)
    finally:
        env.close()
    listed = None
    if raw is not None:
        try:
            listed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExtractError(f"{what} {path}: corrupt __keys__ ({e}); use --overwrite") from None
    return keys, listed


def committed_keys(layout: Layout) -> Set[str]:
    """Images already committed: records of the db and of every shard."""
    keys, _ = _keys_of(layout.db, "image db")
    for d in layout.shard_dirs():
        keys |= _keys_of(d, "extraction shard")[0]
    return keys


def read_failed(path: str) -> List[Tuple[str, str, str]]:
    """(path, key, reason) rows of a ``failed.tsv`` (none when it is absent)."""
    if not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [tuple(r[:3]) for r in rows[1:] if len(r) >= 3]  # type: ignore[misc]


def _clean(text: str) -> str:
    """One TSV field: tabs and line breaks as spaces."""
    return str(text).translate({9: " ", 10: " ", 13: " "})


def write_failed(path: str, rows: Sequence[Tuple[str, str, str]]) -> None:
    """``failed.tsv`` with a header (removed when nothing failed)."""
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    lines = ["path\tkey\treason"] + ["\t".join(_clean(x) for x in r) for r in rows]
    atomic_write(path, "\n".join(lines) + "\n")


def _read_settings(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExtractError(f"{path}: unreadable settings of an earlier run ({e}); use "
                           "--overwrite to rebuild the db, or another --out") from None
    if not isinstance(data, dict):
        raise ExtractError(f"{path}: settings of an earlier run must be a JSON object; use "
                           "--overwrite or another --out")
    return data


def _examples(keys: Set[str], n: int = 3) -> str:
    items = sorted(keys)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def prepare_output(layout: Layout, settings: Dict[str, Any], listed: Sequence[str],
                   overwrite: bool) -> Tuple[str, str]:
    """Rank 0's look at the output directory before a run: ``("run", "")`` or
    ``("complete", message)``; refuses (:class:`ExtractError`) other settings, another image
    list for a finished db, or a db this tool did not start, unless ``overwrite``."""
    prev = _read_settings(layout.settings)
    if overwrite:
        old = [layout.db, layout.failed, layout.shards, layout.settings]
        if layout.nbb:
            old.append(layout.nbb)
        if prev and str(prev.get("db", "")).startswith("feat_"):
            old.append(os.path.join(layout.out, os.path.basename(str(prev["db"]))))
            if prev.get("nbb_file"):
                old.append(os.path.join(layout.out, os.path.basename(str(prev["nbb_file"]))))
        for p in old:
            _remove(p)
        prev = None
    here = [p for p in (layout.db, layout.shards) if os.path.exists(p)]
    earlier_db = (os.path.join(layout.out, os.path.basename(str(prev.get("db"))))
                  if prev and prev.get("db") else None)
    if prev is not None and not here and not (earlier_db and os.path.exists(earlier_db)):
        prev = None     # an earlier start that committed nothing (bad weights?): nothing to keep
    if prev is None and here:
        raise ExtractError(f"{layout.out} already holds {', '.join(here)} but no "
                           f"{SETTINGS_FILE} (not written by this tool, or its settings file "
                           "was removed); use --overwrite to rebuild it, or another --out")
    if prev is not None:
        got = {k: v for k, v in prev.items() if k in settings}
        diffs = [f"{k}: earlier {got.get(k)!r}, now {v!r}" for k, v in settings.items()
                 if got.get(k) != v]
        if diffs:
            raise ExtractError(f"{layout.settings}: this run's settings differ from those of "
                               f"the earlier run in {layout.out}: " + "; ".join(diffs)
                               + ". Rerun with the earlier settings to finish it, use "
                               "--overwrite to rebuild it, or give another --out")
    want = set(listed)
    done = _keys_of(layout.db, "image db")[1]
    if done is not None:
        have = set(done)
        failed_before = {r[1] for r in read_failed(layout.failed)}
        unlisted, new = have - want, want - have
        if unlisted or new - failed_before:
            parts = []
            if new - failed_before:
                parts.append(f"{len(new - failed_before)} listed image(s) are not in it "
                             f"({_examples(new - failed_before)})")
            if unlisted:
                parts.append(f"{len(unlisted)} of its images are not listed "
                             f"({_examples(unlisted)})")
            raise ExtractError(f"image db {layout.db} is finished ({len(have)} images) from "
                               f"another image list: {'; '.join(parts)}. Use --overwrite to "
                               "rebuild it, or another --out")
        if not new:
            if os.path.isdir(layout.shards):
                _remove(layout.shards)      # left over from a merge killed before cleanup
            return "complete", (f"image db {layout.db} is complete: {len(have)} images, the "
                                "same image list; nothing to do")
        # the images that failed before are retried; the db gets those that now succeed
    else:
        stray = committed_keys(layout) - want
        if stray:
            raise ExtractError(f"{layout.out}: an unfinished earlier run committed "
                               f"{len(stray)} image(s) that this image list does not hold "
                               f"({_examples(stray)}). Rerun it with the same --images and "
                               "--prefix, use --overwrite to rebuild, or another --out")
    if prev is None:
        data = dict(settings, db=layout.db_name,
                    nbb_file=os.path.basename(layout.nbb) if layout.nbb else None)
        atomic_write(layout.settings, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return "run", ""


# --------------------------------------------------------------------------- reading images


class ImageFiles(torch.utils.data.Dataset):
    """``(index, PreparedImage or None, error or None)`` of each listed image: read and
    preprocessed in a DataLoader worker; a file that cannot be read gives its error."""

    def __init__(self, items: Sequence[Tuple[str, str]], cfg: DetectorConfig):
        self.items, self.cfg = list(items), cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[int, Optional[PreparedImage], Optional[str]]:
        path = self.items[i][0]
        try:
            return i, prepare(load_image(path), self.cfg), None
        except ImageError as e:
            return i, None, _without_path(str(e), path)
        except Exception as e:      # anything else about one file: reported, not a crash
            return i, None, f"{type(e).__name__}: {e}"


def _without_path(msg: str, path: str) -> str:
    return msg[len(path) + 2:] if msg.startswith(path + ": ") else msg


def _as_is(x: Any) -> Any:
    return x


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- one rank


@dataclass
class RankResult:
    done: int = 0
    skipped: int = 0
    boxes: int = 0
    failed: List[Tuple[str, str, str]] = field(default_factory=list)


class _Progress:
    """A tqdm bar (images/s and boxes/image in the postfix), or a line every minute."""

    def __init__(self, total: int, show: bool, bar: bool, desc: str):
        self.total, self.show, self.desc = total, show, desc
        self.t0 = self.last = time.time()
        self.done = self.boxes = self.failed = 0
        self.bar = None
        if show and bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True,
                            file=sys.stderr)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self, images: int, boxes: int, failed: int = 0) -> None:
        self.done += images
        self.boxes += boxes
        self.failed += failed
        rate = self.done / max(time.time() - self.t0, 1e-9)
        per = self.boxes / max(self.done, 1)
        if self.bar is not None:
            self.bar.set_postfix({"img/s": f"{rate:.2f}", "boxes/img": f"{per:.1f}",
                                  "failed": self.failed}, refresh=False)
            self.bar.update(images + failed)
        elif self.show and time.time() - self.last >= LOG_EVERY_S:
            self.last = time.time()
            print(f"{self.desc}: {self.done + self.failed}/{self.total} images, {rate:.2f} "
                  f"img/s, {per:.1f} boxes/img, {self.failed} failed", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_batch(ext: Extractor, batch: List[Tuple[str, str, PreparedImage]]
               ) -> List[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    """(record, None) or (None, reason) per image: a batch whose forward fails is run one
    image at a time, so one bad image fails alone."""
    try:
        return [(r, None) for r in ext.run([p for _, _, p in batch])]
    except (RuntimeError, ValueError, IndexError, MemoryError) as e:
        if ext.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [(None, f"detector failed: {type(e).__name__}: {str(e).splitlines()[0]}")]
    out = []
    for item in batch:
        out.extend(_run_batch(ext, [item]))
    return out


def extract_rank(ext: Extractor, items: Sequence[Tuple[str, str]], shard: str,
                 batch_size: int, workers: int, progress: _Progress) -> RankResult:
    """Extract ``items`` into the LMDB ``shard``, committing each batch when it is done."""
    res = RankResult()
    if not items:
        return res
    os.makedirs(shard, exist_ok=True)
    env = lmdb.open(shard, map_size=MAP_SIZE, subdir=True, metasync=False, readahead=False)
    loader = torch.utils.data.DataLoader(
        ImageFiles(items, ext.cfg), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_as_is, worker_init_fn=_one_thread if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False)
    window: List[Tuple[str, str, PreparedImage]] = []
    size = WINDOW_PER_BATCH * batch_size

    def fail(path: str, key: str, reason: str) -> None:
        res.failed.append((path, key, reason))
        progress.write(f"failed: {path}: {reason}")

    def flush() -> None:
        for group in aspect_batches([p.size for _, _, p in window], batch_size):
            batch = [window[i] for i in group]
            puts, boxes, bad = [], 0, 0
            for (path, key, _), (rec, err) in zip(batch, _run_batch(ext, batch)):
                if rec is not None:
                    try:
                        value, n = encode_record(rec)
                    except ValueError as e:
                        err = str(e)
                    else:
                        puts.append((key.encode("utf-8"), value))
                        boxes += n
                        continue
                fail(path, key, err)
                bad += 1
            if puts:
                with env.begin(write=True) as txn:
                    for k, v in puts:
                        txn.put(k, v)
            res.done += len(puts)
            res.boxes += boxes
            progress.update(len(puts), boxes, bad)
        window.clear()

    try:
        for i, prepared, err in loader:
            path, key = items[i]
            if prepared is None:
                fail(path, key, err or "cannot be read")
                progress.update(0, 0, 1)
                continue
            window.append((path, key, prepared))
            if len(window) >= size:
                flush()
        flush()
        env.sync(True)
    finally:
        env.close()
    return res


# --------------------------------------------------------------------------- merging


def merge(layout: Layout, order: Sequence[str],
          failed: Sequence[Tuple[str, str, str]] = ()) -> int:
    """Copy every shard into the db, then write the box counts and ``failed.tsv`` (the
    ``failed`` rows), then ``__keys__`` (in ``order``, the image list's; the db is finished
    from here on), and remove the shards.  Returns the number of images in the db (0:
    nothing written)."""
    write_failed(layout.failed, failed)
    shards = layout.shard_dirs()
    db_keys, done = _keys_of(layout.db, "image db")
    new = set()
    for d in shards:
        new |= _keys_of(d, "extraction shard")[0]
    new -= db_keys
    if not db_keys and not new:
        _remove(layout.shards)
        return 0
    if not new and done is not None:
        _remove(layout.shards)
        return len(done)
    os.makedirs(layout.db, exist_ok=True)
    env = lmdb.open(layout.db, map_size=MAP_SIZE, subdir=True, readahead=False)
    try:
        if done is not None:
            with env.begin(write=True) as txn:      # unfinished again until __keys__ below
                txn.delete(KEYS_KEY)
        for d in shards:
            src = _open_read(d, "extraction shard")
            try:
                with src.begin() as rtxn:
                    cur = rtxn.cursor()
                    batch, nbytes = [], 0
                    for k, v in cur.iternext(keys=True, values=True):
                        if k == KEYS_KEY:
                            continue
                        batch.append((k, v))
                        nbytes += len(v)
                        if len(batch) >= MERGE_RECORDS or nbytes >= MERGE_BYTES:
                            _put_all(env, batch)
                            batch, nbytes = [], 0
                    _put_all(env, batch)
            finally:
                src.close()
        with env.begin() as txn:
            present = [k for k in order if txn.get(k.encode("utf-8")) is not None]
            nbb = ({k: record_boxes(txn.get(k.encode("utf-8"))) for k in present}
                   if layout.nbb else None)
        if nbb is not None:
            atomic_write(layout.nbb, json.dumps(nbb))
        with env.begin(write=True) as txn:
            txn.put(KEYS_KEY, json.dumps(present).encode("utf-8"))
        env.sync(True)
    finally:
        env.close()
    _remove(layout.shards)
    return len(present)


def _put_all(env, batch: List[Tuple[bytes, bytes]]) -> None:
    if batch:
        with env.begin(write=True) as txn:
            for k, v in batch:
                txn.put(k, v)


# --------------------------------------------------------------------------- ranks


def dist_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) of ``torchrun``/``deepspeed`` (0, 1, 0 without)."""
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ExtractError(f"environment variable {name}={raw!r} is not an integer") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise ExtractError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


class _Group:
    """The ranks (gloo over MASTER_ADDR/MASTER_PORT); nothing at world size 1."""

    def __init__(self, rank: int, world: int, wait_timeout: float):
        self.rank, self.world, self.wait_timeout = rank, world, wait_timeout
        self.dist = None
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise ExtractError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: "
                                   "start the ranks with torchrun or deepspeed (or set them)")
            import torch.distributed as dist
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            print(f"extract rank {rank}/{world}: joining the other ranks at {where} (gloo, "
                  f"{JOIN_TIMEOUT_S // 60} min at most)", file=sys.stderr, flush=True)
            try:
                dist.init_process_group("gloo", rank=rank, world_size=world,
                                        timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
            except Exception as e:
                raise RankWaitError(f"rank {rank}: the {world} ranks did not meet at {where}: "
                                    f"{str(e).splitlines()[0][:400]}") from None
            self.dist = dist

    def broadcast(self, obj: Any) -> Any:
        if self.dist is None:
            return obj
        box = [obj]
        try:
            self.dist.broadcast_object_list(box, src=0)
        except Exception as e:      # rank 0 gone
            raise RankWaitError(f"rank {self.rank}: no word from rank 0 about the output "
                                f"directory: {str(e).splitlines()[0][:400]}") from None
        return box[0]

    def gather(self, obj: Any, what: str) -> Optional[List[Any]]:
        """Every rank's ``obj`` on rank 0 (None on the others), after all arrived."""
        if self.dist is None:
            return [obj]
        try:
            self.dist.monitored_barrier(
                timeout=datetime.timedelta(seconds=self.wait_timeout), wait_all_ranks=True)
            out = [None] * self.world if self.rank == 0 else None
            self.dist.gather_object(obj, out, dst=0)
        except Exception as e:      # gloo's errors: a peer gone, a timeout
            raise RankWaitError(
                f"rank {self.rank}: waiting for the other ranks ({what}) failed: "
                f"{str(e).splitlines()[0][:400]}. A rank died or did not finish within "
                f"--wait_timeout {self.wait_timeout:g} s; every committed image is kept in "
                "the shards: rerun the same command to finish") from None
        return out

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """What a run did (rank 0: over all ranks; a rank > 0: its own counts)."""
    out: str
    db: str
    #: images in the db at the end (0: no db written)
    images: int = 0
    done: int = 0
    skipped: int = 0
    failed: List[Tuple[str, str, str]] = field(default_factory=list)
    #: the db was complete before this run (nothing done)
    complete_before: bool = False
    rank: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        """The db is there (possibly with failures), or this rank's part is done."""
        return self.images > 0 or self.rank > 0

    def describe(self) -> str:
        if self.complete_before or self.rank > 0:
            return self.message
        n_failed = len(self.failed)
        where = f" (listed in {os.path.join(self.out, FAILED_FILE)})" if n_failed else ""
        head = (f"image db {self.db}: {self.images} images" if self.images
                else f"no image db written ({self.db}): nothing could be extracted")
        return (f"{head}; this run: done {self.done}, skipped {self.skipped} (committed by an "
                f"earlier run), failed {n_failed}{where}")


def extract(o: ExtractOptions, log: Callable[[str], None] = print) -> Summary:
    """Run an extraction (the command line's work); raises :class:`ExtractError` for a run
    that cannot start or finish, :class:`WeightsError` for unusable detector weights."""
    _check_options(o)
    rank, world, local = dist_env()
    if os.path.exists(o.out) and not os.path.isdir(o.out):
        raise ExtractError(f"--out {o.out}: is a file; the image db is a directory (give a "
                           "new or existing directory)")
    try:
        items = sorted(list_images(o.images, o.prefix), key=lambda it: it[1])
    except ImageListError as e:
        raise ExtractError(f"--images: {e}") from None
    weights_file = find_weights_file(o.detector)
    layout = Layout.of(o)
    settings = run_settings(o, weights_file)
    os.makedirs(o.out, exist_ok=True)
    group = _Group(rank, world, o.wait_timeout)
    try:
        return _extract(o, items, layout, settings, group, local, log)
    finally:
        group.close()


def _extract(o: ExtractOptions, items: List[Tuple[str, str]], layout: Layout,
             settings: Dict[str, Any], group: _Group, local: int,
             log: Callable[[str], None]) -> Summary:
    rank, world = group.rank, group.world
    order = [k for _, k in items]
    # rank 0 looks at the directory (and cleans it for --overwrite) and lists what is
    # committed before any rank writes; the others wait for its word
    start: Tuple[str, str, Set[str]] = ("", "", set())
    if rank == 0:
        try:
            action, msg = prepare_output(layout, settings, order, o.overwrite)
            start = (action, msg, committed_keys(layout) if action == "run" else set())
        except ExtractError as e:
            start = ("error", str(e), set())
    action, msg, committed = group.broadcast(start)
    if action == "error":
        raise ExtractError(msg if rank == 0 else f"rank 0 refused to start: {msg}")
    summary = Summary(out=layout.out, db=layout.db, rank=rank)
    if action == "complete":
        summary.complete_before, summary.message = True, msg
        summary.images = len(_keys_of(layout.db, "image db")[1] or [])
        return summary

    mine = items[rank::world]
    todo = [it for it in mine if it[1] not in committed]
    res = RankResult(skipped=len(mine) - len(todo))
    desc = "extract" if world == 1 else f"extract rank {rank}/{world}"
    if todo:
        device = o.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        ext = make_extractor(o.detector, o.preset, min_size=o.min_size, max_size=o.max_size,
                             device=device, precision=o.precision, conf_th=o.conf_th,
                             max_bb=o.max_bb, min_bb=o.min_bb, num_bb=o.num_bb)
        if rank == 0:
            log(f"{desc}: {len(todo)} image(s) to extract, {res.skipped} committed before, "
                f"on {device} ({o.precision}), {world} rank(s)")
        progress = _Progress(len(todo), show=rank == 0, bar=o.progress and rank == 0,
                             desc=desc)
        try:
            got = extract_rank(ext, todo, layout.shard(rank), o.batch_size, o.workers,
                               progress)
        finally:
            progress.close()
        res.done, res.boxes, res.failed = got.done, got.boxes, got.failed

    results = group.gather((res.done, res.skipped, res.failed), "the end of the run")
    if rank != 0:
        summary.done, summary.skipped, summary.failed = res.done, res.skipped, res.failed
        summary.message = (f"{desc}: done {res.done}, skipped {res.skipped}, failed "
                           f"{len(res.failed)}; rank 0 writes the db")
        return summary
    assert results is not None
    for done, skipped, failed in results:
        summary.done += done
        summary.skipped += skipped
        summary.failed.extend(failed)
    by_key = {k: i for i, k in enumerate(order)}
    summary.failed.sort(key=lambda r: by_key.get(r[1], len(order)))
    summary.images = merge(layout, order, summary.failed)
    return summary
