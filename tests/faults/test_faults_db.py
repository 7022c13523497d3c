"""Fault injection on the dbs (issue #19 items 1, 10, 13, 15): a db record never runs
code (an object array's pickle payload is refused, not unpickled), a truncated LMDB is
refused when opened (a DbError, not SIGBUS), unreadable or non-LMDB directories say
why, and a bool token id is not taken as 1/0."""
import io
import os
import pickle
import subprocess
import sys
import textwrap

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest

from uniter_fast.data.db import (
    DbError,
    DetectFeatLmdb,
    TxtTokLmdb,
    check_lmdb_file,
    decode_msgpack_numpy,
    img_db_name,
    write_img_db,
    write_txt_db,
)
from uniter_fast.data.re import ReTxtTokLmdb, write_re_txt_db
from uniter_fast.data.vcr import VcrTxtTokLmdb, write_vcr_txt_db

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = {"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 100], "bert": "t"}
RULE = dict(conf_th=0.2, max_bb=10, min_bb=2)     # the box rule of the test image dbs


class _OpenOnUnpickle:
    """Unpickling this creates ``marker`` (pickle calls ``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _dumps(n=6, seed=0, rows=10, dim=64):
    rng = np.random.default_rng(seed)
    return {f"i{i}.npz": {"features": rng.random((rows, dim)).astype(np.float32),
                          "norm_bb": rng.random((rows, 6)).astype(np.float32),
                          "conf": rng.random(rows).astype(np.float32),
                          "soft_labels": rng.random((rows, 5)).astype(np.float32)}
            for i in range(n)}


def _img_db(img_dir, compress, n=6):
    write_img_db(str(img_dir), _dumps(n), compress=compress, **RULE)
    return str(img_dir), os.path.join(str(img_dir), img_db_name(num_bb=36, compress=compress,
                                                                **RULE))


def _open_img(img_dir, compress):
    return DetectFeatLmdb(img_dir, compress=compress, **RULE)


def _txt_db(db_dir, n=40):
    recs = {str(i): {"input_ids": list(range(5, 35)), "img_fname": f"i{i % 6}.npz"}
            for i in range(n)}
    write_txt_db(str(db_dir), recs, META)
    return str(db_dir)


def _put_raw(db_path, key, value):
    env = lmdb.open(db_path, map_size=1 << 24)
    with env.begin(write=True) as t:
        t.put(key.encode(), value)
    env.close()


def _raw_records(db_path):
    """Every record's bytes (read before a reader opens the db: py-lmdb opens an
    environment once per process)."""
    env = lmdb.open(db_path, readonly=True, lock=False)
    with env.begin() as t:
        out = {k.decode(): v for k, v in t.cursor() if k != b"__keys__"}
    env.close()
    return out


def _mnp_record(**fields):
    """An uncompressed image record as msgpack-numpy writes it (fields given as
    already-encoded dicts stay as they are)."""
    return msgpack.dumps(fields, use_bin_type=True, default=msgpack_numpy.encode)


def _object_entry(payload):
    """msgpack-numpy's encoding of an object array: the data is a pickle."""
    return {b"nd": True, b"type": [["", "|O"]], b"kind": b"O", b"shape": [1], b"data": payload}


def _good_fields(seed=1):
    rng = np.random.default_rng(seed)
    return {"features": rng.random((4, 64)).astype(np.float16),
            "norm_bb": rng.random((4, 6)).astype(np.float16),
            "conf": rng.random(4).astype(np.float16),
            "soft_labels": rng.random((4, 5)).astype(np.float16)}


# ----------------------------------------------------------------------------- item 1

def test_object_array_record_is_refused_without_running_pickle(tmp_path):
    img_dir, db_path = _img_db(tmp_path / "img", compress=False)
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_OpenOnUnpickle(marker))
    raw = _mnp_record(**dict(_good_fields(), features=_object_entry(payload)))
    _put_raw(db_path, "i1.npz", raw)

    db = _open_img(img_dir, compress=False)
    db.get_dump("i0.npz")                                   # the other records still read
    with pytest.raises(DbError) as e:
        db.get_dump("i1.npz")
    msg = str(e.value)
    assert db_path in msg and "'i1.npz'" in msg and "'features'" in msg
    assert "object array" in msg and "pickle" in msg and "numeric arrays only" in msg
    assert "allow_pickle" not in msg and "msgpack_numpy" not in msg   # no unsafe advice
    assert not os.path.exists(marker)
    # the reader's decoder alone, on the raw record
    with pytest.raises(DbError, match="object array"):
        decode_msgpack_numpy(msgpack.loads(raw, raw=False))
    assert not os.path.exists(marker)
    # control: the payload is live (msgpack-numpy's own decoder runs it)
    msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
    assert os.path.exists(marker)


def test_object_array_refused_when_box_counts_are_computed_at_open(tmp_path):
    """Without an nbb_*.json the reader decodes every record's conf when it opens."""
    img_dir = str(tmp_path / "img")
    write_img_db(img_dir, _dumps(3), compress=False, **RULE)
    os.rename(os.path.join(img_dir, img_db_name(num_bb=36, compress=False, **RULE)),
              os.path.join(img_dir, "all"))
    os.remove(os.path.join(img_dir, "nbb_th0.2_max10_min2.json"))
    marker = str(tmp_path / "pwned")
    bad = dict(_good_fields(), conf=_object_entry(pickle.dumps(_OpenOnUnpickle(marker))))
    _put_raw(os.path.join(img_dir, "all"), "i2.npz", _mnp_record(**bad))
    with pytest.raises(DbError, match=r"all: record 'i2.npz': field 'conf': object array"):
        _open_img(img_dir, compress=False)
    assert not os.path.exists(marker)


def test_object_array_in_compressed_record_is_refused(tmp_path):
    img_dir, db_path = _img_db(tmp_path / "img", compress=True)
    marker = str(tmp_path / "pwned")
    arr = np.empty(1, dtype=object)
    arr[0] = _OpenOnUnpickle(marker)
    with io.BytesIO() as w:
        np.savez_compressed(w, **dict(_good_fields(), features=arr))
        _put_raw(db_path, "i1.npz", w.getvalue())
    with pytest.raises(DbError, match=r"record 'i1.npz'"):
        _open_img(img_dir, compress=True).get_dump("i1.npz")
    assert not os.path.exists(marker)


def _structured():
    return msgpack_numpy.encode(np.zeros((4, 6), dtype=[("a", "<f4"), ("b", "<i4")]))


@pytest.mark.parametrize("entry, why", [
    (_structured, "structured"),
    # a dtype list with an empty kind: still a structured description, never built
    (lambda: {b"nd": True, b"type": [["a", "<f4"]], b"kind": b"", b"shape": [4, 6],
              b"data": b"\0" * 96}, "not a dtype string"),
    (lambda: {b"nd": True, b"type": "|O", b"kind": b"", b"shape": [4, 6],
              b"data": b"\0" * 192}, "kind 'O'"),
    (lambda: {b"nd": True, b"type": "<U2", b"kind": b"", b"shape": [4, 6],
              b"data": b"\0" * 192}, "kind 'U'"),
    (lambda: {b"nd": True, b"type": "<M8[s]", b"kind": b"", b"shape": [4, 6],
              b"data": b"\0" * 192}, "kind 'M'"),
    (lambda: {b"nd": True, b"type": "<f4", b"kind": b"X", b"shape": [4, 6],
              b"data": b"\0" * 96}, "unknown kind"),
    (lambda: {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [4, 6],
              b"data": b"\0" * 95}, "95 bytes"),
    (lambda: {b"nd": False, b"type": "|O", b"data": b"\0" * 8}, "kind 'O'"),
    (lambda: {b"nd": True, b"kind": b"", b"shape": [4, 6], b"data": b"\0" * 96}, "no 'type'"),
])
def test_non_numeric_msgpack_entries_are_refused(tmp_path, entry, why):
    img_dir, db_path = _img_db(tmp_path / "img", compress=False)
    _put_raw(db_path, "i1.npz", _mnp_record(**dict(_good_fields(), norm_bb=entry())))
    with pytest.raises(DbError) as e:
        _open_img(img_dir, compress=False).get_dump("i1.npz")
    msg = str(e.value)
    assert db_path in msg and "'i1.npz'" in msg and "'norm_bb'" in msg and why in msg, msg


def test_structured_array_in_compressed_record_is_refused(tmp_path):
    img_dir, db_path = _img_db(tmp_path / "img", compress=True)
    with io.BytesIO() as w:
        np.savez_compressed(w, **dict(_good_fields(),
                                      norm_bb=np.zeros((4, 6), dtype=[("a", "<f4")])))
        _put_raw(db_path, "i1.npz", w.getvalue())
    with pytest.raises(DbError, match=r"record 'i1.npz': field 'norm_bb' has dtype .*numeric"):
        _open_img(img_dir, compress=True).get_dump("i1.npz")


def test_uncompressed_db_reads_as_msgpack_numpy_decodes_it(tmp_path):
    img_dir, db_path = _img_db(tmp_path / "img", compress=False)
    raws = _raw_records(db_path)
    db = _open_img(img_dir, compress=False)
    assert sorted(db.names()) == sorted(raws)
    for name in db.names():
        raw = raws[name]
        ref = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
        ours = decode_msgpack_numpy(msgpack.loads(raw, raw=False))
        assert ours.keys() == ref.keys()
        for k in ref:
            assert ours[k].dtype == ref[k].dtype == np.float16       # written as fp16
            assert ours[k].shape == ref[k].shape
            np.testing.assert_array_equal(ours[k], ref[k])
        got = db.get_dump(name)
        nbb = db.nbb(name)
        for k in ("features", "norm_bb", "soft_labels"):
            np.testing.assert_array_equal(got[k], ref[k][:nbb].astype(np.float32))
    # and the same db written compressed reads identically
    cimg, _ = _img_db(tmp_path / "cimg", compress=True)
    cdb = _open_img(cimg, compress=True)
    for name in db.names():
        for k, v in db.get_dump(name).items():
            np.testing.assert_array_equal(v, cdb.get_dump(name)[k])


def test_every_numeric_kind_decodes_as_msgpack_numpy(tmp_path):
    rng = np.random.default_rng(3)
    value = {
        "f2": rng.random((3, 5)).astype(np.float16), "f4": rng.random(7).astype(np.float32),
        "f8_be": rng.random((2, 2)).astype(">f8"), "i8": np.arange(-4, 8, dtype=np.int64),
        "u1": np.arange(10, dtype=np.uint8).reshape(2, 5), "b1": np.array([True, False]),
        "c8": (rng.random(3) + 1j * rng.random(3)).astype(np.complex64),
        "zero_d": np.array(2.5, dtype=np.float32), "empty": np.zeros((0, 4), np.float16),
        "strided": np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],
        "scalars": [np.float32(1.5), np.int16(-3), np.bool_(True), np.uint64(2**63)],
        "nested": {"c": 1 + 2j, "arrs": [np.ones(2, np.float64), {"x": np.int8(-1)}]},
        "plain": [1, "two", None, 3.0],
    }
    raw = msgpack.dumps(value, use_bin_type=True, default=msgpack_numpy.encode)
    ref = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
    ours = decode_msgpack_numpy(msgpack.loads(raw, raw=False))

    def same(a, b):
        assert type(a) is type(b), (a, b)
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b and getattr(a, "dtype", None) == getattr(b, "dtype", None)

    same(ours, ref)
    # a db written without bin types has str keys: accepted too
    arr = rng.random((2, 3)).astype(np.float32)
    str_keys = {"nd": True, "type": arr.dtype.str, "kind": "", "shape": [2, 3],
                "data": arr.tobytes()}
    got = decode_msgpack_numpy(msgpack.loads(msgpack.dumps({"a": str_keys}, use_bin_type=True),
                                             raw=False))["a"]
    np.testing.assert_array_equal(got, arr)


def test_text_record_with_a_pickle_payload_is_read_as_plain_data(tmp_path):
    """Text records are plain msgpack (no object hook): an encoded object array in one
    stays an inert dict of bytes."""
    path = _txt_db(tmp_path / "txt.db", n=2)
    marker = str(tmp_path / "pwned")
    rec = {"input_ids": list(range(5, 35)), "img_fname": "i0.npz",
           "extra": _object_entry(pickle.dumps(_OpenOnUnpickle(marker)))}
    _put_raw(path, "1", lz4.frame.compress(msgpack.dumps(rec, use_bin_type=True)))
    got = TxtTokLmdb(path, -1)["1"]
    assert isinstance(got["extra"], dict) and got["extra"][b"kind"] == b"O"
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- item 10

_READ_ALL = textwrap.dedent("""
    import os, sys
    from uniter_fast.data.db import DetectFeatLmdb, TxtTokLmdb
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "txt":
        db = TxtTokLmdb(path, -1)
        for k in db.id2len:
            db[k]
    else:
        db = DetectFeatLmdb(path, 0.2, 10, 2, compress=(kind == "img"))
        for k in db.names():
            db.get_dump(k)
    print("read all")
""")

_TRUNCATE_WHILE_OPEN = textwrap.dedent("""
    import os, sys
    from uniter_fast.data.db import TxtTokLmdb
    path = sys.argv[1]
    db = TxtTokLmdb(path, -1)
    db["0"]
    data = os.path.join(path, "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2)
    for k in db.id2len:
        db[k]
    print("read all")
""")


def _run(script, *args):
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _make(kind, tmp_path):
    """(path to pass the reader, the LMDB directory) of a fresh db of ``kind``."""
    if kind == "txt":
        path = _txt_db(tmp_path / "txt.db", n=300)
        return path, path
    return _img_db(tmp_path / "img", compress=(kind == "img"), n=40)


def _psize(lmdb_dir):
    env = lmdb.open(lmdb_dir, readonly=True, lock=False)
    try:
        return env.stat()["psize"], env.info()["last_pgno"]
    finally:
        env.close()


@pytest.mark.parametrize("kind", ["txt", "img", "img_raw"])
def test_intact_db_opens_and_meta_pages_parse_as_lmdb_reads_them(tmp_path, kind):
    path, lmdb_dir = _make(kind, tmp_path)
    psize, last_pg = _psize(lmdb_dir)
    size = os.path.getsize(os.path.join(lmdb_dir, "data.mdb"))
    assert size >= (last_pg + 1) * psize > 3 * psize       # big enough to cut pages off
    check_lmdb_file(lmdb_dir)
    p = _run(_READ_ALL, kind, path)
    assert p.returncode == 0 and "read all" in p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize("kind", ["txt", "img", "img_raw"])
@pytest.mark.parametrize("cut", ["half", "three_pages", "last_page", "one_byte"])
def test_truncated_db_is_refused_at_open_not_sigbus(tmp_path, kind, cut):
    path, lmdb_dir = _make(kind, tmp_path)
    data = os.path.join(lmdb_dir, "data.mdb")
    psize, last_pg = _psize(lmdb_dir)
    size = os.path.getsize(data)
    new = {"half": size // 2, "three_pages": 3 * psize, "last_page": size - psize,
           "one_byte": size - 1}[cut]
    os.truncate(data, new)
    p = _run(_READ_ALL, kind, path)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])    # not -7 (SIGBUS)
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("uniter_fast.data.db.DbError:"), p.stderr[-3000:]
    assert lmdb_dir in err
    assert (f"data.mdb is {new} bytes but its last page ends at {(last_pg + 1) * psize}: "
            "truncated (an incomplete copy/download?)") in err
    with pytest.raises(DbError, match="truncated"):            # and in process, too
        check_lmdb_file(lmdb_dir)


@pytest.mark.parametrize("new_size, why", [(0, "0 bytes, too short"), (100, "100 bytes, too short")])
def test_data_file_too_short_for_meta_pages(tmp_path, new_size, why):
    path = _txt_db(tmp_path / "txt.db")
    os.truncate(os.path.join(path, "data.mdb"), new_size)
    p = _run(_READ_ALL, "txt", path)
    assert p.returncode == 1 and why in p.stderr and path in p.stderr, p.stderr[-3000:]


def test_db_truncated_under_an_open_reader_is_refused(tmp_path):
    path = _txt_db(tmp_path / "txt.db", n=300)
    p = _run(_TRUNCATE_WHILE_OPEN, path)
    assert p.returncode == 1 and "truncated" in p.stderr and path in p.stderr, \
        (p.returncode, p.stderr[-3000:])


# ----------------------------------------------------------------------------- item 13

def test_missing_or_non_lmdb_dirs_say_which(tmp_path):
    with pytest.raises(DbError, match=r"nothing: missing \(no such directory.*id2len\.json"):
        TxtTokLmdb(str(tmp_path / "nothing"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DbError, match="afile: not a directory"):
        TxtTokLmdb(str(tmp_path / "afile"))
    with pytest.raises(DbError, match="afile: not a directory"):
        _open_img(str(tmp_path / "afile"), compress=True)
    # a text db whose JSON files are there but whose LMDB is not
    path = _txt_db(tmp_path / "txt.db", n=2)
    os.remove(os.path.join(path, "data.mdb"))
    with pytest.raises(DbError, match=r"no LMDB database at .*txt\.db: not an LMDB "
                                      r"\(no data\.mdb in it\)"):
        TxtTokLmdb(path)
    # a data.mdb that is not an LMDB file
    path2 = _txt_db(tmp_path / "txt2.db", n=2)
    with open(os.path.join(path2, "data.mdb"), "wb") as f:
        f.write(b"this is not an lmdb file" * 100)
    with pytest.raises(DbError, match=r"txt2\.db: no LMDB database: data\.mdb is not an LMDB"):
        TxtTokLmdb(path2)
    # an image db directory without the db of this box rule / compressed flag
    img_dir, _ = _img_db(tmp_path / "img", compress=False)
    with pytest.raises(DbError, match=r"feat_th0\.2_max10_min2_compressed: missing .*holds "
                                      r"\['feat_th0\.2_max10_min2'\]"):
        _open_img(img_dir, compress=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a non-root user")
def test_unreadable_db_dir_says_permission_denied(tmp_path):
    path = _txt_db(tmp_path / "txt.db", n=2)
    os.chmod(path, 0)
    try:
        with pytest.raises(DbError, match="permission denied"):
            TxtTokLmdb(path)
    finally:
        os.chmod(path, 0o755)
    os.chmod(os.path.join(path, "data.mdb"), 0)
    try:
        with pytest.raises(DbError, match="permission denied reading data.mdb"):
            TxtTokLmdb(path)
    finally:
        os.chmod(os.path.join(path, "data.mdb"), 0o644)


def test_permission_denied_messages_simulated(tmp_path, monkeypatch):
    """The same messages where the tests run as root (which os.access never refuses)."""
    import uniter_fast.data.db as dbmod
    path = _txt_db(tmp_path / "txt.db", n=2)
    real_access, real_open = os.access, open
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: p != path and real_access(p, mode))
    with pytest.raises(DbError, match=r"txt\.db: permission denied \(the directory cannot be "
                                      r"read\)"):
        TxtTokLmdb(path)
    monkeypatch.setattr(os, "access", real_access)

    def deny(file, *a, **kw):
        if str(file).endswith("data.mdb"):
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(dbmod, "open", deny, raising=False)
    with pytest.raises(DbError, match=r"no LMDB database at .*txt\.db: permission denied "
                                      r"reading data\.mdb"):
        TxtTokLmdb(path)


# ----------------------------------------------------------------------------- item 15

@pytest.mark.parametrize("bad, shown", [(True, "True (bool)"), (False, "False (bool)"),
                                        (6.0, "6.0 (float)"), ("7", "'7' (str)"),
                                        (-1, "-1, a negative")])
def test_non_int_token_id_names_db_record_and_position(tmp_path, bad, shown):
    path = str(tmp_path / "txt.db")
    write_txt_db(path, {"a": {"input_ids": [5, 6], "img_fname": "i0.npz"},
                        "b": {"input_ids": [5, bad, 7], "img_fname": "i0.npz"}}, META)
    db = TxtTokLmdb(path)
    assert db["a"]["input_ids"] == [5, 6]
    with pytest.raises(DbError) as e:
        db["b"]
    msg = str(e.value)
    assert (f"text db {path}: record 'b'" in msg and f"input_ids[1] is {shown}" in msg
            and "VCR" not in msg), msg


def test_bool_token_ids_refused_in_vcr_and_re_records(tmp_path):
    vcr = str(tmp_path / "vcr.db")
    rec = {"input_ids": [5, 6], "input_ids_as": [[7], [8], [9, True], [10]],
           "input_ids_rs": [[11], [12], [13], [14]], "qa_target": 0, "qar_target": 1,
           "img_fname": ["gt.npz", "det.npz"]}
    write_vcr_txt_db(vcr, {"val-0": rec, "val-1": dict(rec, input_ids=[False, 6])}, META)
    db = VcrTxtTokLmdb(vcr, -1, task="qa")
    with pytest.raises(DbError, match=r"VCR text db .*vcr\.db: record 'val-0': "
                                      r"input_ids_as\[2\]\[1\] is True \(bool\)"):
        db["val-0"]
    with pytest.raises(DbError, match=r"record 'val-1': input_ids \(the question\)\[0\] is "
                                      r"False \(bool\)"):
        db["val-1"]
    re_db = str(tmp_path / "re.db")
    sent = {"input_ids": [5, True], "image_id": 1, "ann_id": 3, "bbox": [0, 0, 4, 4]}
    write_re_txt_db(re_db, {"0": sent}, [{"ref_id": 0, "image_id": 1, "ann_id": 3,
                                          "sent_ids": [0], "category_id": 1}],
                    [{"id": 3, "image_id": 1, "bbox": [0, 0, 4, 4], "category_id": 1}],
                    [{"id": 1, "name": "thing"}], [{"id": 1, "width": 8, "height": 8}], META)
    with pytest.raises(DbError, match=r"RE text db .*re\.db: record '0': input_ids\[1\] is True"):
        ReTxtTokLmdb(re_db, -1)["0"]
