"""``python -m uniter_fast.extract``: images to UNITER's image db.  A tiny detector
(tests/detector_layouts.py) and small images (the hidden ``--min_size 64 --max_size 100``)
keep every run to a few seconds: awkward and broken image files, the db against the
Extractor API, EXIF orientation, kill -9 and resume, finished dbs and changed settings, a
fixed box count, two ranks, and fine-tuning on the written db."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest
from detector_layouts import TINY, random_weights, write_pkl
from PIL import Image

from uniter_fast.data.db import open_img_db, write_txt_db
from uniter_fast.data.image_keys import ImageListError, image_key, list_images
from uniter_fast.extract import SHARDS_DIR, make_extractor, read_failed
from uniter_fast.extract.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["--min_size", "64", "--max_size", "100"]
DB = "feat_th0.2_max100_min10_compressed"
NBB = "nbb_th0.2_max100_min10.json"
#: the tiny network's region feature width (res2 16 channels x 8) and soft label width
FEAT_DIM = TINY["res2"] * 8
LABEL_DIM = TINY["classes"] + 1
FIELDS = ("features", "norm_bb", "conf", "soft_labels", "obj_ids", "attr_ids", "boxes")
BAD = {"corrupt.npz", "truncated.npz", "notes.npz"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _cmd(weights, images, out, *args):
    return [sys.executable, "-m", "uniter_fast.extract", "--detector", weights, "--images",
            images, "--out", out, "--no_progress", *SIZES, *args]


def _run(cmd, expect=0, env=None, timeout=180):
    p = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != expect:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}, expected {expect}\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _records(out, db=DB):
    """(__keys__, {key: {field: array}}) read from a copy of the db (the readers of this
    process may hold the original open; LMDB allows one handle per process)."""
    tmp = out.rstrip("/") + f".copy{time.monotonic_ns()}"
    shutil.copytree(os.path.join(out, db), tmp)
    env = lmdb.open(tmp, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            keys = json.loads(txn.get(b"__keys__"))
            recs = {}
            for k in keys:
                with np.load(io.BytesIO(txn.get(k.encode())), allow_pickle=False) as z:
                    recs[k] = {f: z[f] for f in z.files}
    finally:
        env.close()
        shutil.rmtree(tmp)
    return keys, recs


def _assert_same_records(got, want, rtol=2e-3, atol=2e-3):
    """Records equal: integer arrays exactly, float ones up to float16 storage."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert set(got[k]) == set(want[k]) == set(FIELDS), k
        for f in FIELDS:
            a, b = np.asarray(got[k][f]), np.asarray(want[k][f])
            assert a.shape == b.shape, (k, f, a.shape, b.shape)
            if b.dtype.kind in "iu":
                np.testing.assert_array_equal(a, b, err_msg=f"{k} {f}")
            else:
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32),
                                           rtol=rtol, atol=atol, err_msg=f"{k} {f}")


def _mtimes(out, *names):
    paths = [os.path.join(out, DB, "data.mdb")] + [os.path.join(out, n) for n in names]
    return [os.stat(p).st_mtime_ns for p in paths]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("extract_weights") / "vg_tiny.pkl")
    write_pkl(path, random_weights(TINY, seed=1))
    return path


def _write_images(d):
    """Every awkward kind of image file that is still an image; returns key -> path."""
    rng = np.random.default_rng(3)

    def rgb(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1)
        return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)

    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    Image.fromarray(rgb(61, 97)).save(os.path.join(d, "odd.jpg"), quality=92)
    Image.fromarray(rgb(150, 70)).save(os.path.join(d, "sub", "portrait.JPG"), quality=92)
    Image.fromarray(rgb(1, 1)).save(os.path.join(d, "one.png"))
    Image.fromarray(rgb(7, 5)).save(os.path.join(d, "sub", "five_by_seven.bmp"))
    Image.fromarray(rgb(80, 120)[..., 0]).save(os.path.join(d, "gray.png"))
    rgba = np.concatenate([rgb(90, 90), rng.integers(0, 255, (90, 90, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "alpha.png"))
    Image.fromarray(rgb(70, 110)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        os.path.join(d, "palette.png"))
    deep = (rng.integers(0, 65535, (66, 88))).astype(np.uint16)
    img16 = Image.fromarray(deep)
    assert img16.mode.startswith("I")
    img16.save(os.path.join(d, "deep16.png"))
    cmyk = Image.frombytes("CMYK", (84, 60), rng.integers(0, 255, (60, 84, 4),
                                                          dtype=np.uint8).tobytes())
    cmyk.save(os.path.join(d, "cmyk.jpg"), quality=92)
    # stored 100 wide x 60 high, shown (EXIF orientation 6: rotate 90 clockwise) 60 x 100
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb(100, 60)).transpose(Image.Transpose.ROTATE_90).save(
        os.path.join(d, "rotated.jpg"), quality=95, exif=exif.tobytes())
    # the same picture saved upright: the decoded, EXIF-applied pixels as a lossless PNG
    from PIL import ImageOps
    with Image.open(os.path.join(d, "rotated.jpg")) as im:
        assert im.size == (100, 60)
        ImageOps.exif_transpose(im).save(os.path.join(d, "upright.png"))
    open(os.path.join(d, "readme.txt"), "w").write("not listed: not an image name\n")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract_images")
    clean = str(base / "clean")
    _write_images(clean)
    mixed = str(base / "mixed")
    shutil.copytree(clean, mixed)
    good = open(os.path.join(clean, "odd.jpg"), "rb").read()
    open(os.path.join(mixed, "corrupt.jpg"), "wb").write(
        b"\xff\xd8\xff\xe0" + np.random.default_rng(5).bytes(3000))
    open(os.path.join(mixed, "sub", "truncated.jpg"), "wb").write(good[:len(good) * 2 // 5])
    open(os.path.join(mixed, "notes.png"), "w").write("this is a text file\n")
    return {"clean": clean, "mixed": mixed}


@pytest.fixture(scope="module")
def api(weights, images):
    """The Extractor API's record of every good image, one image per forward."""
    ext = make_extractor(weights, min_size=64, max_size=100)
    items = list_images(images["clean"])
    recs = ext([p for p, _ in items], batch_size=1)
    return {k: r for (_, k), r in zip(items, recs)}


@pytest.fixture(scope="module")
def reference(weights, images, tmp_path_factory):
    """An uninterrupted single-process run over the clean folder: its output dir."""
    out = str(tmp_path_factory.mktemp("extract_ref") / "img_db")
    _run(_cmd(weights, images["clean"], out, "--batch_size", "2"))
    return out


@pytest.fixture(scope="module")
def mixed_run(weights, images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("extract_mixed") / "img_db")
    p = _run(_cmd(weights, images["mixed"], out, "--workers", "2", "--batch_size", "3"))
    return out, p


# ----------------------------------------------------------------------------- image keys


def test_image_keys_and_listing(tmp_path, images):
    assert image_key("a/b/000000000009.jpg", "coco_train2014_") == \
        "coco_train2014_000000000009.npz"
    assert image_key("x.y.PNG", "nlvr2_") == "nlvr2_x.y.npz"
    items = list_images(images["clean"])
    assert [p for p, _ in items] == sorted(p for p, _ in items)
    keys = {k for _, k in items}
    assert "portrait.npz" in keys and "five_by_seven.npz" in keys     # subfolder, any case
    assert "readme.npz" not in keys and len(keys) == 11

    lst = tmp_path / "list.txt"
    lst.write_text("# my images\n\nclean/odd.jpg\n  clean/sub/portrait.JPG  \n"
                   f"{images['clean']}/gray.png\n")
    os.symlink(images["clean"], tmp_path / "clean")
    got = list_images(str(lst), "p_")
    assert [k for _, k in got] == ["p_odd.npz", "p_portrait.npz", "p_gray.npz"]
    assert got[0][0] == os.path.join(str(tmp_path), "clean", "odd.jpg")

    lst.write_text("clean/odd.jpg\nclean/sub/../odd.png\n")
    with pytest.raises(ImageListError, match=r"odd\.jpg and .*odd\.png have the same image "
                                             r"key 'odd\.npz'"):
        list_images(str(lst))
    with pytest.raises(ImageListError, match="no such file or folder"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageListError, match="no image files"):
        list_images(str(tmp_path / "empty"))
    lst.write_text("# nothing\n\n")
    with pytest.raises(ImageListError, match="holds no image paths"):
        list_images(str(lst))


# ----------------------------------------------------------------------------- awkward files


def test_awkward_and_broken_files(mixed_run, api, images, weights):
    out, p = mixed_run
    assert "done 11, skipped 0" in p.stdout and "failed 3" in p.stdout, p.stdout
    for name in ("corrupt.jpg", "sub/truncated.jpg", "notes.png"):
        assert f"failed: {os.path.join(images['mixed'], name)}: " in p.stderr, p.stderr
    failed = read_failed(os.path.join(out, "failed.tsv"))
    assert {k for _, k, _ in failed} == BAD and len(failed) == 3
    assert all(path.startswith(images["mixed"]) and reason for path, _, reason in failed)
    reasons = {k: r for _, k, r in failed}
    assert "not an image" in reasons["notes.npz"]
    assert "truncated" in reasons["truncated.npz"] or "decoded" in reasons["truncated.npz"]

    # every good image through the training side's reader
    db = open_img_db(out, {"img_dim": FEAT_DIM})
    assert sorted(db.names()) == sorted(api)
    for k, rec in api.items():
        d = db.get_dump(k)
        n = len(rec["conf"])
        assert db.nbb(k) == n and d["features"].shape == (n, FEAT_DIM)
        assert d["soft_labels"].shape == (n, LABEL_DIM) and d["norm_bb"].shape == (n, 6)
    # each record is the Extractor API's (batched, in workers, float16 in the db)
    keys, recs = _records(out)
    assert keys == sorted(api)
    _assert_same_records(recs, {k: {f: r[f] for f in FIELDS} for k, r in api.items()})
    assert recs["odd.npz"]["features"].dtype == np.float16
    assert recs["odd.npz"]["obj_ids"].dtype.kind == "i"
    with open(os.path.join(out, NBB)) as f:
        assert json.load(f) == {k: len(r["conf"]) for k, r in api.items()}
    assert not os.path.exists(os.path.join(out, SHARDS_DIR))

    # a rerun retries the three that failed (they fail again), the db stays as it was
    before = _mtimes(out, NBB)
    p = _run(_cmd(weights, images["mixed"], out))
    assert "done 0, skipped 11" in p.stdout and "failed 3" in p.stdout, p.stdout
    assert _mtimes(out, NBB) == before
    assert {k for _, k, _ in read_failed(os.path.join(out, "failed.tsv"))} == BAD


def test_exif_rotated_jpeg_is_the_upright_image(api, mixed_run):
    rot, up = api["rotated.npz"], api["upright.npz"]
    assert (rot["height"], rot["width"]) == (up["height"], up["width"]) == (100, 60)
    np.testing.assert_allclose(rot["boxes"], up["boxes"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(rot["obj_ids"], up["obj_ids"])
    assert rot["boxes"][:, 2].max() <= 60 + 1e-3 and rot["boxes"][:, 3].max() <= 100 + 1e-3
    _, recs = _records(mixed_run[0])
    np.testing.assert_array_equal(recs["rotated.npz"]["boxes"], recs["upright.npz"]["boxes"])
    np.testing.assert_array_equal(recs["rotated.npz"]["norm_bb"], recs["upright.npz"]["norm_bb"])


# ----------------------------------------------------------------------------- resume


def _shard_entries(out):
    path = os.path.join(out, SHARDS_DIR, "rank0")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:
        env = lmdb.open(path, readonly=True, lock=True)
    except lmdb.Error:
        return 0
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def test_kill_resume_finished_settings_overwrite(weights, images, reference, tmp_path, capsys):
    out = str(tmp_path / "img_db")
    cmd = _cmd(weights, images["clean"], out, "--batch_size", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and _shard_entries(out) < 1:
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    committed = _shard_entries(out)
    assert 1 <= committed < 11
    assert not os.path.exists(os.path.join(out, DB))

    p = _run(cmd)
    assert f"skipped {committed} (committed by an earlier run)" in p.stdout, p.stdout
    assert f"done {11 - committed}," in p.stdout
    keys, recs = _records(out)
    ref_keys, ref_recs = _records(reference)
    assert keys == ref_keys
    _assert_same_records(recs, ref_recs)
    assert not os.path.exists(os.path.join(out, SHARDS_DIR))
    assert not os.path.exists(os.path.join(out, "failed.tsv"))

    # finished: a rerun says so and rewrites nothing
    before = _mtimes(out, NBB, "extract_settings.json")
    p = _run(cmd)
    assert "is complete" in p.stdout and "11 images" in p.stdout
    assert _mtimes(out, NBB, "extract_settings.json") == before

    # other settings, another image list: refused, naming what differs (in-process: fast)
    argv = cmd[3:]
    assert cli_main(argv + ["--prefix", "coco_", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "prefix: earlier '', now 'coco_'" in err
    assert "precision: earlier 'fp32', now 'bf16'" in err and "--overwrite" in err
    assert cli_main(argv + ["--min_size", "80"]) == 2
    assert "min_size: earlier 64, now 80" in capsys.readouterr().err
    mixed = list(argv)
    mixed[mixed.index("--images") + 1] = images["mixed"]
    assert cli_main(mixed) == 2
    err = capsys.readouterr().err
    assert "another image list" in err and "3 listed image(s) are not in it" in err
    assert "--overwrite" in err and "another --out" in err
    assert _mtimes(out, NBB, "extract_settings.json") == before

    # --overwrite rebuilds it
    p = _run(cmd + ["--overwrite", "--batch_size", "4"])
    assert "done 11, skipped 0" in p.stdout
    assert _mtimes(out, NBB)[0] != before[0]
    keys, recs = _records(out)
    assert keys == ref_keys
    _assert_same_records(recs, ref_recs)


# ----------------------------------------------------------------------------- layouts, ranks


def test_fixed_box_count_from_a_list_file(weights, images, api, tmp_path):
    lst = tmp_path / "images.txt"
    names = ["odd.jpg", "sub/portrait.JPG", "one.png", "cmyk.jpg"]
    lst.write_text("# a few\n" + "\n".join(os.path.join(images["clean"], n) for n in names)
                   + "\n\n")
    out = str(tmp_path / "img_db")
    p = _run(_cmd(weights, str(lst), out, "--num_bb", "7", "--prefix", "t_"))
    assert "done 4," in p.stdout
    assert os.path.isdir(os.path.join(out, "feat_numbb7_compressed"))
    assert not any(n.startswith("nbb_") for n in os.listdir(out))
    keys, recs = _records(out, "feat_numbb7_compressed")
    assert keys == ["t_cmyk.npz", "t_odd.npz", "t_one.npz", "t_portrait.npz"]
    ext = make_extractor(weights, min_size=64, max_size=100, num_bb=7)
    paths = {image_key(n, "t_"): os.path.join(images["clean"], n) for n in names}
    for k in keys:
        (want,) = ext([paths[k]], batch_size=1)
        # 7 boxes, fewer only for an image with fewer proposals (the default rule's record
        # has at least min_bb = 10 when there are that many)
        if len(api[k[2:]]["conf"]) >= 7:
            assert len(want["conf"]) == 7
        assert recs[k]["features"].shape == (len(want["conf"]), FEAT_DIM)
        np.testing.assert_allclose(recs[k]["conf"].astype(np.float32), want["conf"],
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(recs[k]["obj_ids"], want["obj_ids"])
    db = open_img_db(out, {"conf_th": -1, "num_bb": 7, "img_dim": FEAT_DIM})
    assert db.get_dump("t_odd.npz")["features"].shape == (7, FEAT_DIM)


def test_two_ranks_merge_into_the_single_process_db(weights, images, reference, tmp_path):
    out = str(tmp_path / "img_db")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(_cmd(weights, images["clean"], out), cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"{o}\n{e}"
    assert "rank 1/2: done 5, skipped 0, failed 0" in outs[1][0]
    assert "11 images; this run: done 11, skipped 0" in outs[0][0]
    keys, recs = _records(out)
    ref_keys, ref_recs = _records(reference)
    assert keys == ref_keys
    _assert_same_records(recs, ref_recs)
    assert not os.path.exists(os.path.join(out, SHARDS_DIR))


# ----------------------------------------------------------------------------- errors


def test_clear_errors(weights, images, tmp_path, capsys):
    out = str(tmp_path / "img_db")
    base = ["--detector", weights, "--images", images["clean"], "--out", out, *SIZES,
            "--no_progress"]

    def fails(argv, *words):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err, err

    def replaced(opt, value):
        argv = list(base)
        argv[argv.index(opt) + 1] = value
        return argv

    fails(replaced("--detector", str(tmp_path / "nope.pkl")), "--detector", "nope.pkl",
          "no such file")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    fails(replaced("--detector", str(junk)), "error: --detector: ", "junk.pkl")
    fails(replaced("--images", str(tmp_path / "none")), "--images", "none",
          "no such file or folder")
    (tmp_path / "a_file").write_text("x")
    fails(replaced("--out", str(tmp_path / "a_file")), "--out", "a_file", "is a file")
    fails(base + ["--min_bb", "0"], "--min_bb", "got 0")
    fails(base + ["--min_bb", "20", "--max_bb", "10"], "--min_bb", "max_bb=10", "got 20")
    fails(base + ["--conf_th", "1.5"], "--conf_th", "[0, 1]", "1.5")
    fails(base + ["--conf_th", "-1"], "--num_bb")
    fails(base + ["--num_bb", "0"], "--num_bb", "got 0")
    fails(base + ["--num_bb", "5", "--max_bb", "9"], "--num_bb", "excludes --max_bb")
    fails(base + ["--batch_size", "0"], "--batch_size", "got 0")
    # the failed starts above committed nothing: a good run goes ahead in the same --out
    assert cli_main(base) == 0
    assert "11 images" in capsys.readouterr().out

    # nothing extractable: no db, the failures listed, exit 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (bad / "b.png").write_text("text")
    out2 = str(tmp_path / "img_db2")
    argv = replaced("--out", out2)
    argv[argv.index("--images") + 1] = str(bad)
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    assert "nothing could be extracted" in captured.out and "failed 2" in captured.out
    assert {k for _, k, _ in read_failed(os.path.join(out2, "failed.tsv"))} == {"a.npz",
                                                                                 "b.npz"}
    assert not os.path.exists(os.path.join(out2, DB))


# ----------------------------------------------------------------------------- training side


def test_finetune_vqa_on_the_extracted_db(reference, tmp_path):
    with open(os.path.join(reference, NBB)) as f:
        keys = sorted(json.load(f))
    meta = {"CLS": 1, "SEP": 2, "MASK": 3, "UNK": 4, "PAD": 0, "v_range": [5, 128]}
    examples = {}
    for i, k in enumerate(keys):
        for j in range(8):
            qid = f"{i}_{j}"
            examples[qid] = {"question_id": qid, "input_ids": [5 + i, 20 + j, 40],
                             "img_fname": k, "target": {"labels": [j % 3], "scores": [1.0]}}
    txt = str(tmp_path / "txt_vqa.db")
    write_txt_db(txt, examples, meta)
    with open(os.path.join(ROOT, "uniter_fast", "configs",
                           "finetune-vqa-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    for k in ("synthetic_task", "synthetic_pretrain"):
        cfg.pop(k, None)
    run = str(tmp_path / "run")
    cfg.update(train_txt_dbs=[txt], train_img_dbs=[reference], val_txt_db=txt,
               val_img_db=reference, checkpoint=None, img_dim=FEAT_DIM, conf_th=0.2,
               max_bb=100, min_bb=10, num_train_steps=2, warmup_steps=1, valid_steps=2,
               save_steps=2, log_steps=1, train_batch_size=512, val_batch_size=1024,
               output_dir=run)
    path = str(tmp_path / "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    _run([sys.executable, os.path.join(ROOT, "uniter_fast", "finetune.py"), "--task", "vqa",
          "--config", path, "--deepspeed_config", os.path.join(ROOT, "ds.json"),
          "--no_progress", "--precision", "fp32"], timeout=300)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert any(r.get("event") == "validation" for r in recs)
