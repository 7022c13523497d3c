"""Readers and writers for UNITER's preprocessed LMDB format.

Text db (``txt_db``): a directory that is an LMDB environment whose values are
lz4-frame-compressed msgpack dicts (``input_ids``, ``img_fname``, ...) keyed by
text id, next to ``id2len.json``, ``txt2img.json``, ``img2txts.json`` and
``meta.json`` (``CLS``, ``SEP``, ``MASK``, ``v_range``, ...).

Image db (``img_db``): a directory holding
``feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]/`` (an LMDB of per-image
records: ``np.savez_compressed`` bytes when compressed, msgpack-numpy otherwise,
with ``features`` fp16 [n, 2048], ``norm_bb`` [n, 6], ``conf`` [n] and
``soft_labels`` [n, label_dim]) and ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json``
(number of boxes per image).  With ``conf_th == -1`` the db is
``feat_numbb{num_bb}`` and every image uses ``num_bb`` boxes, or all of its rows
when a record holds fewer (UNITER slices ``arr[:num_bb]``).

Every read is validated: a missing key, a corrupt record, non-finite values or
shapes that disagree raise :class:`DbError` (a ``ValueError``) naming the db
and the key, so training never silently runs on garbage.

Reading a db never runs code from it: text records are plain msgpack (no object
hook), compressed image records are read with ``allow_pickle=False``, and
uncompressed (msgpack-numpy) image records are decoded by :func:`decode_msgpack_numpy`,
which accepts numeric arrays and scalars only (msgpack-numpy's own decoder would
unpickle an object array).  Opening an LMDB first checks its ``data.mdb`` against the
size its meta pages require (:func:`check_lmdb_file`): a truncated file would otherwise
kill the process with SIGBUS on the first read past its end.
"""
from __future__ import annotations

import io
import json
import os
import struct
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
from lz4.frame import compress as lz4_compress
from lz4.frame import decompress as lz4_decompress

from ..constants import DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB, DEFAULT_NUM_BB

__all__ = ["DbError", "compute_num_bb", "TxtTokLmdb", "DetectFeatLmdb", "write_txt_db",
           "write_img_db", "img_db_name", "nbb_file_name", "open_img_db", "check_token_ids",
           "check_lmdb_file", "decode_msgpack_numpy"]

_MAP_SIZE = 1 << 34   # 16 GiB of address space (sparse; grows only as written)
#: records per write transaction of :func:`write_txt_db`
_TXN_RECORDS = 10000


class DbError(ValueError):
    """A UNITER db is missing, corrupt or inconsistent."""


def compute_num_bb(confs: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """UNITER's dynamic box count: ``min(max_bb, max(min_bb, #(conf > conf_th)))``."""
    n = max(int(min_bb), int((np.asarray(confs) > conf_th).sum()))
    return int(min(int(max_bb), n))


def img_db_name(conf_th: float, max_bb: int, min_bb: int, num_bb: int, compress: bool) -> str:
    name = f"feat_numbb{num_bb}" if conf_th == -1 else f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    return name + ("_compressed" if compress else "")


def nbb_file_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    return f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DbError(f"{what}: missing file {path}") from None
    except PermissionError:
        raise DbError(f"{what}: permission denied reading {path}") from None
    except IsADirectoryError:
        raise DbError(f"{what}: {path} is a directory, not a JSON file") from None
    except NotADirectoryError:
        raise DbError(f"{what}: cannot read {path}: a component of the path is not a "
                      "directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DbError(f"{what}: corrupt JSON {path}: {e}") from None
    except OSError as e:
        raise DbError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def _dir_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a readable directory (missing, not a directory, permission
    denied), or None when it is one."""
    if not os.path.lexists(path):
        return "missing (no such directory)"
    if not os.path.exists(path):
        return "missing (a dangling symbolic link)"
    if not os.path.isdir(path):
        return "not a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return "permission denied (the directory cannot be read)"
    return None


def check_token_ids(ids: Any, where: str, field: str = "input_ids",
                    nonempty: bool = False, upper: Optional[int] = None) -> None:
    """``ids`` must be a list of non-negative ints (below ``upper``, the db's vocabulary
    end, when given); ``True``/``False`` are not token ids (Python would take them as 1/0).
    Raises :class:`DbError` naming ``where`` (the db and the record), the field and the
    position of the first bad id."""
    if not isinstance(ids, (list, tuple)):
        raise DbError(f"{where}: {field} must be a list of token ids (non-negative ints), "
                      f"got {type(ids).__name__}")
    if nonempty and not ids:
        raise DbError(f"{where}: {field} is empty")
    for pos, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DbError(f"{where}: {field}[{pos}] is {t!r} ({type(t).__name__}), not a token "
                          "id (a non-negative int)")
        if t < 0:
            raise DbError(f"{where}: {field}[{pos}] is {t}, a negative token id")
        if upper is not None and t >= upper:
            raise DbError(f"{where}: {field}[{pos}] is {t}, past the db's vocabulary "
                          f"(meta.json v_range ends at {upper})")


# ----------------------------------------------------------------------------- LMDB files

# LMDB's data.mdb starts with two meta pages (lmdb.h / mdb.c, MDB_DATA_VERSION 1, 64-bit):
# a 16-byte page header (mp_pgno u64, mp_pad u16, mp_flags u16, 4 bytes) then MDB_meta:
# mm_magic u32, mm_version u32, mm_address, mm_mapsize, mm_dbs[2] (48 bytes each; the
# page size is mm_dbs[0].md_pad, u32), mm_last_pg u64, mm_txnid u64.  The file is native
# byte order.
_MDB_MAGIC = 0xBEEFC0DE
_MDB_DATA_VERSION = 1
_P_META = 0x08
_PAGEHDRSZ = 16
_META_PSIZE = _PAGEHDRSZ + 24
_META_LAST_PG = _PAGEHDRSZ + 120
_META_END = _META_LAST_PG + 16


def _read_meta(buf: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(version, page size, last page number, txn id) of one meta page's leading bytes,
    or None if they are not an LMDB meta page."""
    if len(buf) < _META_END:
        return None
    _pgno, _pad, flags = struct.unpack_from("=QHH", buf, 0)
    magic, version = struct.unpack_from("=II", buf, _PAGEHDRSZ)
    if magic != _MDB_MAGIC or not flags & _P_META:
        return None
    (psize,) = struct.unpack_from("=I", buf, _META_PSIZE)
    last_pg, txnid = struct.unpack_from("=QQ", buf, _META_LAST_PG)
    return version, psize, last_pg, txnid


def check_lmdb_file(path: str, what: str = "LMDB") -> None:
    """Refuse an LMDB directory whose ``data.mdb`` is shorter than its own meta pages say
    (an incomplete copy or download): LMDB maps the file and a read past its end kills
    the process with SIGBUS.  Reads the two meta pages with plain file reads (never
    through the map), so the check itself cannot fault."""
    data = os.path.join(path, "data.mdb")
    try:
        with open(data, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_META_END)
            meta0 = _read_meta(head)
            if meta0 is None:
                if size < _META_END:
                    raise DbError(f"{what} {path}: data.mdb is {size} bytes, too short to hold "
                                  "LMDB's meta pages: truncated (an incomplete copy/download?)")
                raise DbError(f"{what} {path}: no LMDB database: data.mdb is not an LMDB data "
                              "file (no LMDB meta page at its start)")
            version, psize = meta0[0], meta0[1]
            if version != _MDB_DATA_VERSION or psize < 512 or psize & (psize - 1):
                return      # a layout this check does not know: leave it to LMDB
            f.seek(psize)
            meta1 = _read_meta(f.read(_META_END))
    except FileNotFoundError:
        raise DbError(f"{what}: no LMDB database at {path}: not an LMDB (no data.mdb in "
                      "it)") from None
    except PermissionError:
        raise DbError(f"{what}: no LMDB database at {path}: permission denied reading "
                      "data.mdb") from None
    except IsADirectoryError:
        raise DbError(f"{what}: no LMDB database at {path}: not an LMDB (data.mdb is a "
                      "directory)") from None
    # the newer meta page is the one LMDB uses; the file must hold every page up to it
    metas = [m for m in (meta0, meta1) if m is not None and m[1] == psize]
    last_pg = max(metas, key=lambda m: m[3])[2]
    need = max(last_pg + 1, 2) * psize
    if size < need:
        raise DbError(f"{what} {path}: data.mdb is {size} bytes but its last page ends at "
                      f"{need}: truncated (an incomplete copy/download?)")


_OPEN_ENVS: Dict[Tuple[int, str], Tuple[Tuple[int, ...], Any, Any]] = {}


def db_identity(path: str) -> Tuple[int, ...]:
    """What changes when an LMDB at ``path`` is rebuilt or rewritten: device, inode,
    mtime and size of its ``data.mdb`` (one ``stat``)."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        raise DbError(f"no LMDB database at {path} (data.mdb is gone)") from None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _reader(path: str, ident: Optional[Tuple[int, ...]] = None, what: str = "LMDB"):
    """One read-only LMDB environment + transaction per (process, path, db identity):
    py-lmdb refuses to open an environment twice in a process, handles must not
    cross a fork (DataLoader workers), and a db rebuilt at the same path (new
    inode, or rewritten: new mtime) is reopened instead of served from the old
    snapshot.  Every (re)open first checks ``data.mdb`` for truncation
    (:func:`check_lmdb_file`)."""
    key = (os.getpid(), os.path.realpath(path))
    ident = ident if ident is not None else db_identity(path)
    entry = _OPEN_ENVS.get(key)
    if entry is not None and entry[0] != ident:
        _, old_env, old_txn = _OPEN_ENVS.pop(key)
        old_txn.abort()
        old_env.close()
        entry = None
    if entry is None:
        check_lmdb_file(path, what)
        env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=False,
                        max_readers=1024)
        entry = (ident, env, env.begin(buffers=False))
        _OPEN_ENVS[key] = entry
    return entry[2]


class _LazyEnv:
    """Read-only LMDB handle opened lazily per process (safe with forked DataLoader workers)."""

    def __init__(self, path: str, what: str):
        problem = _dir_problem(path)
        if problem is not None:
            raise DbError(f"{what}: no LMDB database at {path}: {problem}")
        # data.mdb present, readable and as long as its meta pages say (else DbError)
        check_lmdb_file(path, what)
        self.path = path
        self.what = what

    def identity(self) -> Tuple[int, ...]:
        return db_identity(self.path)

    def get(self, key: str) -> bytes:
        try:
            val = _reader(self.path, what=self.what).get(key.encode("utf-8"))
        except lmdb.Error as e:
            raise DbError(f"{self.what} {self.path}: LMDB error reading key {key!r}: {e}") from None
        if val is None:
            raise DbError(f"{self.what} {self.path}: missing key {key!r}")
        return val


class TxtTokLmdb:
    """UNITER's tokenized text db (``TxtTokLmdb``), with validated reads.

    ``max_txt_len`` (-1 = no limit) drops captions longer than it, as in UNITER.
    """

    #: the lengths file (VCR's dbs have one per task: ``id2len_qa.json``, ``id2len_qar.json``)
    id2len_file = "id2len.json"

    def __init__(self, db_dir: str, max_txt_len: int = 60):
        self.db_dir = os.path.normpath(db_dir)
        what = "text db"
        problem = _dir_problem(self.db_dir)
        if problem is not None:
            raise DbError(f"text db {self.db_dir}: {problem} (a text db is a directory holding "
                          f"{self.id2len_file}, meta.json and an LMDB)")
        id2len = _load_json(os.path.join(self.db_dir, self.id2len_file), what)
        if not isinstance(id2len, dict):
            raise DbError(f"text db {self.db_dir}: id2len.json must map id -> length")
        self.id2len = {k: int(v) for k, v in id2len.items()
                       if max_txt_len == -1 or int(v) <= max_txt_len}
        #: the length limit and how many texts it dropped (UNITER drops, never truncates)
        self.max_txt_len, self.n_too_long = int(max_txt_len), len(id2len) - len(self.id2len)
        meta = _load_json(os.path.join(self.db_dir, "meta.json"), what)
        for key in ("CLS", "SEP", "MASK", "v_range"):
            if key not in meta:
                raise DbError(f"text db {self.db_dir}: meta.json lacks {key!r}")
        self.meta = meta
        self.cls_ = int(meta["CLS"])
        self.sep = int(meta["SEP"])
        self.mask = int(meta["MASK"])
        self.v_range = [int(meta["v_range"][0]), int(meta["v_range"][1])]
        if self.v_range[1] <= self.v_range[0]:
            raise DbError(f"text db {self.db_dir}: empty v_range {self.v_range}")
        self._env = _LazyEnv(self.db_dir, "text db")
        self._txt2img = None
        self._img2txts = None

    def __len__(self) -> int:
        return len(self.id2len)

    def _load(self, id_: str) -> Any:
        """The decoded record, unvalidated (task dbs such as RE/VCR check their own fields)."""
        raw = self._env.get(id_)
        try:
            return msgpack.loads(lz4_decompress(raw), raw=False)
        except Exception as e:  # lz4 / msgpack raise various types
            raise DbError(f"text db {self.db_dir}: corrupt record {id_!r} "
                          f"({type(e).__name__}: {e})") from None

    def __getitem__(self, id_: str) -> Dict[str, Any]:
        dump = self._load(id_)
        if not isinstance(dump, dict) or "input_ids" not in dump or "img_fname" not in dump:
            raise DbError(f"text db {self.db_dir}: record {id_!r} lacks input_ids/img_fname")
        ids = dump["input_ids"]
        check_token_ids(ids, f"text db {self.db_dir}: record {id_!r}", upper=self.v_range[1])
        expect = self.id2len.get(id_)
        if expect is not None and expect != len(ids):
            raise DbError(f"text db {self.db_dir}: record {id_!r} has {len(ids)} tokens but "
                          f"id2len.json says {expect}")
        return dump

    def combine_inputs(self, *inputs: Iterable[int]) -> List[int]:
        """[CLS] a [SEP] b [SEP] ..."""
        out = [self.cls_]
        for ids in inputs:
            out.extend(list(ids) + [self.sep])
        return out

    @property
    def txt2img(self) -> Dict[str, Union[str, List[str]]]:
        """id -> image name, or list of image names (NLVR2)."""
        if self._txt2img is None:
            self._txt2img = _load_json(os.path.join(self.db_dir, "txt2img.json"), "text db")
        return self._txt2img

    @property
    def img2txts(self) -> Dict[str, List[str]]:
        if self._img2txts is None:
            self._img2txts = _load_json(os.path.join(self.db_dir, "img2txts.json"), "text db")
        return self._img2txts


class DetectFeatLmdb:
    """UNITER's detected-region feature db (``DetectFeatLmdb``), with validated reads.

    Decoded records are cached (LRU, ``cache_mb``); the cache is keyed on the db's
    identity (:func:`db_identity`), so a db rebuilt at the same path while the
    process runs is read afresh (box counts included).
    """

    def __init__(self, img_dir: str, conf_th: float = DEFAULT_CONF_TH,
                 max_bb: int = DEFAULT_MAX_BB, min_bb: int = DEFAULT_MIN_BB,
                 num_bb: int = DEFAULT_NUM_BB, compress: bool = True,
                 img_dim: Optional[int] = None,
                 cache_mb: float = 256.0):
        self.img_dir = os.path.normpath(img_dir)
        problem = _dir_problem(self.img_dir)
        if problem is not None:
            raise DbError(f"image db {self.img_dir}: {problem}")
        # decoded, validated records (LRU, bounded by bytes; per process)
        self._cache: "OrderedDict[Tuple[str, bool], Dict[str, np.ndarray]]" = OrderedDict()
        self._cache_bytes, self._cache_max = 0, int(cache_mb * 2**20)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress = compress
        self.img_dim = img_dim
        if conf_th != -1 and not (1 <= min_bb <= max_bb):
            raise DbError(f"image db {self.img_dir}: need 1 <= min_bb <= max_bb, "
                          f"got min_bb={min_bb}, max_bb={max_bb}")
        name = img_db_name(conf_th, max_bb, min_bb, num_bb, compress)
        self.name2nbb: Dict[str, int]
        nbb_path = os.path.join(self.img_dir, nbb_file_name(conf_th, max_bb, min_bb))
        if conf_th == -1:
            self._fixed_nbb = int(num_bb)
            self.name2nbb = None  # type: ignore[assignment]
        elif os.path.exists(nbb_path):
            self._fixed_nbb = None
            self.name2nbb = {k: int(v) for k, v in _load_json(nbb_path, "image db").items()}
        else:
            # nbb not pre-computed: UNITER then reads the "all" db and computes it
            name = "all_compressed" if compress else "all"
            self._fixed_nbb = None
            self.name2nbb = None  # type: ignore[assignment]
        self.db_path = os.path.join(self.img_dir, name)
        if not os.path.lexists(self.db_path):
            found = sorted(n for n in os.listdir(self.img_dir)
                           if n.startswith(("feat_", "all")) and
                           os.path.isdir(os.path.join(self.img_dir, n)))
            raise DbError(f"image db: no LMDB database at {self.db_path}: missing (the box "
                          f"rule and compressed flag name it; {self.img_dir} holds "
                          f"{found or 'no feat_*/all* db'})")
        self._env = _LazyEnv(self.db_path, "image db")
        self._nbb_path = nbb_path if self.name2nbb is not None else None
        if self.name2nbb is None and self._fixed_nbb is None:
            self.name2nbb = self._compute_nbb()
        # the cache (and box counts) belong to this identity of the db
        self._ident = self._env.identity()

    def _check_identity(self) -> None:
        """Drop cached records and re-read the box counts when the db was rebuilt."""
        ident = self._env.identity()
        if ident != self._ident:
            self._cache.clear()
            self._cache_bytes = 0
            self._ident = ident
            if self._nbb_path is not None:
                self.name2nbb = {k: int(v)
                                 for k, v in _load_json(self._nbb_path, "image db").items()}
            elif self._fixed_nbb is None:
                self.name2nbb = self._compute_nbb()

    def _keys(self) -> List[str]:
        raw = self._env.get("__keys__")
        try:
            return json.loads(raw.decode("utf-8"))
        except Exception as e:
            raise DbError(f"image db {self.db_path}: corrupt __keys__ ({e})") from None

    def _compute_nbb(self) -> Dict[str, int]:
        return {k: compute_num_bb(self._conf(k), self.conf_th, self.min_bb, self.max_bb)
                for k in self._keys()}

    def _conf(self, fname: str) -> np.ndarray:
        dump = self._raw(fname, ("conf",))
        if "conf" not in dump:
            raise DbError(f"image db {self.db_path}: record {fname!r} lacks 'conf'")
        return np.asarray(dump["conf"])

    def nbb(self, fname: str) -> int:
        if self._fixed_nbb is not None:
            return self._fixed_nbb
        try:
            return self.name2nbb[fname]
        except KeyError:
            raise DbError(f"image db {self.img_dir}: no box count for image {fname!r}") from None

    def names(self) -> List[str]:
        return list(self.name2nbb) if self.name2nbb is not None else self._keys()

    def _raw(self, fname: str, keys: Iterable[str] = ("conf",)) -> Dict[str, np.ndarray]:
        """Decode the requested arrays of one record (absent keys are left out)."""
        raw = self._env.get(fname)
        where = f"image db {self.db_path}: record {fname!r}"
        try:
            if self.compress:
                # allow_pickle=False: an object array raises instead of unpickling
                with io.BytesIO(raw) as reader, np.load(reader, allow_pickle=False) as npz:
                    dump = {k: npz[k] for k in keys if k in npz.files}
            else:
                # plain msgpack, then our numeric-only decoding (never msgpack_numpy.decode,
                # which unpickles object arrays)
                dump = msgpack.loads(raw, raw=False)
                if isinstance(dump, dict):
                    dump = {k: decode_msgpack_numpy(v, f"field {k!r}") for k, v in dump.items()}
        except _Refused as e:
            raise DbError(f"{where}: {e}") from None
        except Exception as e:
            raise DbError(f"image db {self.db_path}: corrupt record {fname!r} "
                          f"({type(e).__name__}: {e})") from None
        if not isinstance(dump, dict):
            raise DbError(f"{where} is not a dict")
        for k, v in dump.items():
            if isinstance(v, np.ndarray) and (v.dtype.kind not in _NUMERIC_KINDS
                                              or v.dtype.fields is not None):
                raise DbError(f"{where}: field {k!r} has dtype {v.dtype} (kind "
                              f"{v.dtype.kind!r}): refused (a db must hold numeric arrays "
                              "only)")
        return dump

    def get_dump(self, fname: str, with_soft_labels: bool = True) -> Dict[str, np.ndarray]:
        """Validated record cut to this image's box count, float32.

        Keys: ``features`` [nbb, d], ``norm_bb`` [nbb, 6], and (if requested)
        ``soft_labels`` [nbb, label_dim].  Treat the arrays as read-only (cached).
        """
        self._check_identity()
        key = (fname, with_soft_labels)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        out = self._decode(fname, with_soft_labels)
        size = sum(a.nbytes for a in out.values())
        if size <= self._cache_max:
            self._cache[key] = out
            self._cache_bytes += size
            while self._cache_bytes > self._cache_max:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= sum(a.nbytes for a in old.values())
        return out

    def _decode(self, fname: str, with_soft_labels: bool) -> Dict[str, np.ndarray]:
        need = ["features", "norm_bb"] + (["soft_labels"] if with_soft_labels else [])
        dump = self._raw(fname, need)
        nbb = self.nbb(fname)
        if self._fixed_nbb is not None and "features" in dump and np.ndim(dump["features"]):
            # conf_th == -1: UNITER reads arr[:num_bb], so a record with fewer boxes
            # (RE/VCR ground-truth boxes) keeps all of its rows
            nbb = min(nbb, int(np.shape(dump["features"])[0]))
        where = f"image db {self.db_path}: record {fname!r}"
        out = {}
        for key in need:
            if key not in dump:
                raise DbError(f"{where} lacks {key!r}")
            try:
                arr = np.asarray(dump[key])
            except ValueError as e:     # a ragged list from a foreign writer
                raise DbError(f"{where}: {key} is not an array ({e})") from None
            if arr.dtype.kind not in "biuf":
                raise DbError(f"{where}: {key} has dtype {arr.dtype}; real numbers expected")
            if arr.ndim != 2:
                raise DbError(f"{where}: {key} must be 2-D, got shape {arr.shape}")
            if arr.shape[0] < nbb:
                raise DbError(f"{where}: {key} has {arr.shape[0]} rows but {nbb} boxes are "
                              "required")
            arr = arr[:nbb].astype(np.float32)
            if not np.isfinite(arr).all():
                raise DbError(f"{where}: {key} contains NaN or inf")
            out[key] = arr
        if out["norm_bb"].shape[1] != 6:
            raise DbError(f"{where}: norm_bb must have 6 columns, got {out['norm_bb'].shape}")
        if self.img_dim is not None and out["features"].shape[1] != self.img_dim:
            raise DbError(f"{where}: features have dim {out['features'].shape[1]}, "
                          f"expected {self.img_dim}")
        if nbb < 1:
            raise DbError(f"{where}: image has no boxes")
        return out

    def __getitem__(self, fname: str) -> Tuple[np.ndarray, np.ndarray]:
        d = self.get_dump(fname, with_soft_labels=False)
        return d["features"], d["norm_bb"]


# ----------------------------------------------------------------------------- msgpack-numpy

#: dtype kinds a db array may have: bool, signed/unsigned int, float, complex
_NUMERIC_KINDS = "biufc"
_REFUSED = "refused (a db must hold numeric arrays only"


class _Refused(DbError):
    """A msgpack-numpy entry that :func:`decode_msgpack_numpy` will not decode (the
    readers re-raise it as a :class:`DbError` naming the db and the record)."""


def _entry_get(obj: Dict[Any, Any], name: str, where: str) -> Any:
    """``obj[b'name']``, or ``obj['name']`` (a db written without bin types)."""
    for k in (name.encode("ascii"), name):
        if k in obj:
            return obj[k]
    raise _Refused(f"{where}: malformed msgpack-numpy entry (no {name!r})")


def _numeric_dtype(descr: Any, where: str) -> np.dtype:
    """The dtype of a dtype string (``'<f2'``, ``'|b1'``, ...), numeric kinds only;
    never a list description (that is a structured array)."""
    if isinstance(descr, bytes):
        descr = descr.decode("ascii", "replace")
    if not isinstance(descr, str):
        raise _Refused(f"{where}: dtype description {descr!r} is not a dtype string: "
                       f"{_REFUSED})")
    try:
        dt = np.dtype(descr)
    except (TypeError, ValueError, SyntaxError) as e:
        raise _Refused(f"{where}: unknown dtype {descr!r} ({e})") from None
    if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _Refused(f"{where}: dtype {descr!r} (kind {dt.kind!r}) {_REFUSED})")
    return dt


def _decode_entry(obj: Dict[Any, Any], where: str) -> Any:
    """One msgpack-numpy dict (``nd``: True = array, False = scalar; or ``complex``)."""
    def has(name):
        return name.encode("ascii") in obj or name in obj

    if has("nd"):
        nd = _entry_get(obj, "nd", where)
        if nd is True:
            kind = obj.get(b"kind", obj.get("kind", b""))
            if isinstance(kind, str):
                kind = kind.encode("ascii", "replace")
            if kind == b"O":
                raise _Refused(f"{where}: object array {_REFUSED}; decoding it would run "
                               "pickle)")
            if kind == b"V":
                raise _Refused(f"{where}: structured (kind 'V') array {_REFUSED})")
            if kind != b"":
                raise _Refused(f"{where}: array of unknown kind {kind!r} {_REFUSED})")
            dt = _numeric_dtype(_entry_get(obj, "type", where), where)
            shape = _entry_get(obj, "shape", where)
            if (not isinstance(shape, (list, tuple)) or
                    not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                            for n in shape)):
                raise _Refused(f"{where}: bad array shape {shape!r}")
            data = _entry_get(obj, "data", where)
            if not isinstance(data, (bytes, bytearray)):
                raise _Refused(f"{where}: array data is {type(data).__name__}, not bytes")
            count = 1
            for n in shape:
                count *= n
            if len(data) != count * dt.itemsize:
                raise _Refused(f"{where}: array data is {len(data)} bytes but shape "
                               f"{list(shape)} of {dt} needs {count * dt.itemsize}")
            return np.frombuffer(data, dtype=dt).reshape(shape)
        if nd is False:
            dt = _numeric_dtype(_entry_get(obj, "type", where), where)
            data = _entry_get(obj, "data", where)
            if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
                raise _Refused(f"{where}: a {dt} scalar needs {dt.itemsize} bytes of data, got "
                               f"{data!r:.40}")
            return np.frombuffer(data, dtype=dt)[0]
        raise _Refused(f"{where}: malformed msgpack-numpy entry ('nd' is {nd!r})")
    if has("complex"):
        data = _entry_get(obj, "data", where)
        if isinstance(data, bytes):
            data = data.decode("ascii", "replace")
        if not isinstance(data, str):
            raise _Refused(f"{where}: complex number data is {type(data).__name__}")
        try:
            return complex(data)
        except ValueError:
            raise _Refused(f"{where}: bad complex number {data!r:.40}") from None
    return obj


def decode_msgpack_numpy(obj: Any, where: str = "value") -> Any:
    """Decode msgpack-numpy's encoding in a value that ``msgpack.loads(raw, raw=False)``
    returned (no object hook), like ``object_hook=msgpack_numpy.decode`` but numeric
    arrays and scalars only: an object array (which msgpack-numpy would unpickle), a
    structured array or any other dtype kind than b/i/u/f/c raises.  Any dict with an
    ``nd`` or ``complex`` key is taken as an encoded value and must be a valid one.
    Arrays are read-only views of the record's bytes, as msgpack-numpy's.

    Raises :class:`DbError` naming ``where``; the readers add the db and the record."""
    if isinstance(obj, dict):
        obj = {k: decode_msgpack_numpy(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return _decode_entry(obj, where)
    if isinstance(obj, list):
        return [decode_msgpack_numpy(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


# ----------------------------------------------------------------------------- writers

def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _img_fnames(img_fname: Any, where: str) -> List[str]:
    """The image(s) of a text record: one name, or a list of names (NLVR2 pairs)."""
    if isinstance(img_fname, str):
        return [img_fname]
    if (isinstance(img_fname, (list, tuple)) and img_fname
            and all(isinstance(f, str) for f in img_fname)):
        return list(img_fname)
    raise DbError(f"{where}: img_fname must be an image name or a non-empty list of names, "
                  f"got {img_fname!r}")


def write_txt_db(db_dir: str, examples: Union[Dict[str, Dict[str, Any]],
                                               Iterable[Tuple[str, Dict[str, Any]]]],
                 meta: Dict[str, Any]) -> int:
    """Write a text db in UNITER's format.  ``examples``: id -> dict, or an iterable of
    ``(id, dict)`` pairs (written as they come, committed every ``_TXN_RECORDS`` records;
    an id given twice raises :class:`DbError`), each dict with at least
    ``input_ids`` (list of int) and ``img_fname``: an image name (str) or, for a
    record over several images (NLVR2's pair), a list of names; ``txt2img.json``
    then maps the id to that list (as UNITER's ``prepro.py``) and ``img2txts.json``
    lists the id under each of its images.  Other fields (``target``, ...) are
    stored as they are.  Returns the number of records written."""
    os.makedirs(db_dir, exist_ok=True)
    env = lmdb.open(db_dir, map_size=_MAP_SIZE, subdir=True)
    id2len, txt2img, img2txts = {}, {}, {}
    items = examples.items() if hasattr(examples, "items") else examples
    txn = None
    try:
        txn = env.begin(write=True)
        for id_, ex in items:
            if id_ in id2len:
                raise DbError(f"text db {db_dir}: record id {id_!r} given twice")
            fnames = _img_fnames(ex.get("img_fname"), f"text db {db_dir}: record {id_!r}")
            txn.put(id_.encode("utf-8"), lz4_compress(msgpack.dumps(ex, use_bin_type=True)))
            id2len[id_] = len(ex["input_ids"])
            txt2img[id_] = ex["img_fname"] if isinstance(ex["img_fname"], str) else fnames
            for f in dict.fromkeys(fnames):
                img2txts.setdefault(f, []).append(id_)
            if len(id2len) % _TXN_RECORDS == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    except BaseException:
        if txn is not None:
            txn.abort()          # a finished transaction ignores it
        raise
    finally:
        env.close()
    _atomic_json(os.path.join(db_dir, "id2len.json"), id2len)
    _atomic_json(os.path.join(db_dir, "txt2img.json"), txt2img)
    _atomic_json(os.path.join(db_dir, "img2txts.json"), img2txts)
    _atomic_json(os.path.join(db_dir, "meta.json"), meta)
    return len(id2len)


def write_img_db(img_dir: str, dumps: Dict[str, Dict[str, np.ndarray]], conf_th: float = 0.2,
                 max_bb: int = 100, min_bb: int = 10, num_bb: int = 36,
                 compress: bool = True) -> Dict[str, int]:
    """Write an image db like UNITER's ``scripts/convert_imgdir.py``: float32
    arrays stored as fp16, records cut to the dynamic box count, ``__keys__``
    and the ``nbb_*.json`` file.  Returns name -> nbb."""
    name = img_db_name(conf_th, max_bb, min_bb, num_bb, compress)
    path = os.path.join(img_dir, name)
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=_MAP_SIZE, subdir=True)
    name2nbb = {}
    with env.begin(write=True) as txn:
        for fname, dump in dumps.items():
            nbb = (int(num_bb) if conf_th == -1
                   else compute_num_bb(dump["conf"], conf_th, min_bb, max_bb))
            rec = {}
            for k, arr in dump.items():
                arr = np.asarray(arr)
                if arr.dtype == np.float32:
                    arr = arr.astype(np.float16)
                rec[k] = arr[:nbb]
            if compress:
                with io.BytesIO() as w:
                    np.savez_compressed(w, **rec)
                    val = w.getvalue()
            else:
                val = msgpack.dumps(rec, use_bin_type=True, default=msgpack_numpy.encode)
            txn.put(fname.encode("utf-8"), val)
            name2nbb[fname] = nbb
        txn.put(b"__keys__", json.dumps(list(name2nbb)).encode("utf-8"))
    env.close()
    if conf_th != -1:
        _atomic_json(os.path.join(img_dir, nbb_file_name(conf_th, max_bb, min_bb)), name2nbb)
    return name2nbb


def open_img_db(path: str, cfg: Dict[str, Any], conf_th: Optional[float] = None,
                num_bb: Optional[int] = None) -> "DetectFeatLmdb":
    """The image db at ``path`` with a training config's box rule (``conf_th``, ``max_bb``,
    ``min_bb``, ``num_bb``; UNITER's defaults where absent; ``conf_th``/``num_bb`` given
    here win, e.g. ``-1, 100`` for a ground-truth-box db) and ``img_dim``.
    ``compressed_db`` absent means whichever layout the directory holds (compressed first)."""
    conf_th = cfg.get("conf_th", DEFAULT_CONF_TH) if conf_th is None else conf_th
    num_bb = cfg.get("num_bb", DEFAULT_NUM_BB) if num_bb is None else num_bb
    max_bb, min_bb = cfg.get("max_bb", DEFAULT_MAX_BB), cfg.get("min_bb", DEFAULT_MIN_BB)
    compress = cfg.get("compressed_db")
    if compress is None:
        compress = os.path.isdir(os.path.join(path, img_db_name(conf_th, max_bb, min_bb, num_bb,
                                                                True)))
    return DetectFeatLmdb(path, conf_th, max_bb, min_bb, num_bb, bool(compress),
                          cfg.get("img_dim"))
