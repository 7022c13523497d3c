"""Data layer: UNITER db format (written by the synthetic generator), validation
errors on corrupt dbs, batches, sampler, sharding, task mixing, resumability."""
import collections
import json
import os

import lmdb
import numpy as np
import pytest
import torch

from uniter_fast.data import (
    DbError,
    DetectFeatLmdb,
    ItmDataset,
    MetaLoader,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    SyntheticSpec,
    TaskLoader,
    TokenBucketSampler,
    TxtTokLmdb,
    ensure_synthetic,
    itm_ot_collate,
    mlm_collate,
    mrc_collate,
    mrfr_collate,
    write_img_db,
    write_txt_db,
)
from uniter_fast.data.build import create_train_loader
from uniter_fast.data.synthetic import CLASS_NAMES, build_vocab

SPEC = SyntheticSpec(seed=3, num_classes=6, num_train_images=40, num_val_images=10,
                     regions_per_image=7, min_objects=1, max_objects=4, min_bb=2, max_bb=6)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return ensure_synthetic(SPEC, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _dbs(syn):
    return (TxtTokLmdb(syn["train"], 60),
            DetectFeatLmdb(syn["img"], SPEC.conf_th, SPEC.max_bb, SPEC.min_bb))


# ----------------------------------------------------------------------------- format
def test_synthetic_db_is_uniter_format_and_grounded(syn):
    txt, img = _dbs(syn)
    meta = json.load(open(os.path.join(syn["train"], "meta.json")))
    vocab = build_vocab(SPEC.num_classes)
    assert meta["v_range"] == [5, len(vocab)] and vocab[meta["MASK"]] == "[MASK]"
    assert len(txt) == SPEC.num_train_images * SPEC.captions_per_image
    nbb_json = json.load(open(os.path.join(syn["img"], "nbb_th0.2_max6_min2.json")))
    # raw LMDB values are lz4(msgpack) (text) and npz bytes (image), read independently
    env = lmdb.open(syn["train"], readonly=True, lock=False)
    import lz4.frame
    import msgpack
    with env.begin() as t:
        k0 = next(iter(txt.id2len))
        raw = msgpack.loads(lz4.frame.decompress(t.get(k0.encode())), raw=False)
    env.close()
    assert raw["input_ids"] == txt[k0]["input_ids"]
    for id_ in list(txt.id2len)[:30]:
        ex = txt[id_]
        words = [vocab[i] for i in ex["input_ids"]]
        named = sorted(CLASS_NAMES.index(w) + 1 for w in words if w in CLASS_NAMES)
        assert named == sorted(ex["classes"]), "caption names exactly the image's objects"
        assert txt.txt2img[id_] == ex["img_fname"] and id_ in txt.img2txts[ex["img_fname"]]
        d = img.get_dump(ex["img_fname"])
        nbb = nbb_json[ex["img_fname"]]
        assert d["features"].shape == (nbb, 2048) and d["norm_bb"].shape == (nbb, 6)
        assert d["soft_labels"].shape == (nbb, SPEC.num_classes + 1)
        np.testing.assert_allclose(d["soft_labels"].sum(1), 1.0, atol=2e-3)
        # the object regions carry their class as the detector's argmax
        assert set(ex["classes"]) <= set(d["soft_labels"].argmax(1).tolist())
        # UNITER's num_bb rule, from the record's own confidences
        conf = d["soft_labels"][:, 1:].max(1)
        assert nbb == min(SPEC.max_bb, max(SPEC.min_bb, len(ex["classes"])))
        assert (conf > SPEC.conf_th).sum() == min(nbb, len(ex["classes"]))
        bb = d["norm_bb"]
        np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=2e-3)


def test_img_pos_feat_is_bb_plus_area(syn):
    ds = MlmDataset(*_dbs(syn))
    item = ds[0]
    d = ds.img_db.get_dump(ds.img_fnames[0])
    pos = item["img_pos_feat"]
    assert pos.shape[1] == 7
    torch.testing.assert_close(pos[:, :6], torch.tensor(d["norm_bb"]))
    torch.testing.assert_close(pos[:, 6], torch.tensor(d["norm_bb"][:, 4] * d["norm_bb"][:, 5]))


def test_generation_deterministic_and_atomic(tmp_path):
    small = SyntheticSpec(seed=5, num_train_images=4, num_val_images=2, num_classes=3,
                          max_objects=2, min_bb=2, max_bb=4, regions_per_image=4)
    a = ensure_synthetic(small, cache_dir=str(tmp_path / "a"))
    b = ensure_synthetic(small, cache_dir=str(tmp_path / "b"))
    again = ensure_synthetic(small, cache_dir=str(tmp_path / "a"))
    assert again["root"] == a["root"]
    assert [p for p in os.listdir(tmp_path / "a") if p.startswith(".")] == []
    for split in ("train", "val"):
        ta, tb = TxtTokLmdb(a[split], -1), TxtTokLmdb(b[split], -1)
        assert ta.id2len == tb.id2len and all(ta[k] == tb[k] for k in ta.id2len)
    ia = DetectFeatLmdb(a["img"], 0.2, 4, 2)
    ib = DetectFeatLmdb(b["img"], 0.2, 4, 2)
    for n in ia.names():
        np.testing.assert_array_equal(ia.get_dump(n)["features"], ib.get_dump(n)["features"])
    other = ensure_synthetic(SyntheticSpec(**{**small.__dict__, "seed": 6}),
                             cache_dir=str(tmp_path / "a"))
    assert other["root"] != a["root"]


# ----------------------------------------------------------------------------- corruption
def _tiny_dbs(tmp_path, feats=None, norm_bb=None):
    meta = {"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 20], "bert": "t"}
    write_txt_db(str(tmp_path / "txt.db"),
                 {"a": {"input_ids": [5, 6, 7], "img_fname": "i0.npz"},
                  "b": {"input_ids": [8, 9], "img_fname": "i1.npz"}}, meta)
    rng = np.random.default_rng(0)
    dumps = {}
    for k in ("i0.npz", "i1.npz"):
        dumps[k] = {"features": rng.random((3, 16)).astype(np.float32),
                    "norm_bb": rng.random((3, 6)).astype(np.float32),
                    "conf": np.array([0.9, 0.5, 0.1], np.float32),
                    "soft_labels": rng.random((3, 4)).astype(np.float32)}
    if feats is not None:
        dumps["i1.npz"]["features"] = feats
    if norm_bb is not None:
        dumps["i1.npz"]["norm_bb"] = norm_bb
    write_img_db(str(tmp_path / "img"), dumps, conf_th=0.2, max_bb=3, min_bb=1)
    return str(tmp_path / "txt.db"), str(tmp_path / "img")


def _put_raw(db_path, key, value):
    env = lmdb.open(db_path, map_size=1 << 24)
    with env.begin(write=True) as t:
        if value is None:
            t.delete(key.encode())
        else:
            t.put(key.encode(), value)
    env.close()


def test_reads_and_nbb_rule(tmp_path):
    txt_dir, img_dir = _tiny_dbs(tmp_path)
    img = DetectFeatLmdb(img_dir, 0.2, 3, 1)
    assert img.nbb("i0.npz") == 2          # two confidences above 0.2
    assert DetectFeatLmdb.__name__ and img.get_dump("i0.npz")["features"].shape == (2, 16)
    txt = TxtTokLmdb(txt_dir)
    assert txt["b"]["input_ids"] == [8, 9] and txt.combine_inputs([8, 9]) == [2, 8, 9, 3]


def test_corrupt_lz4_record_names_db_and_key(tmp_path):
    txt_dir, _ = _tiny_dbs(tmp_path)
    _put_raw(txt_dir, "b", b"\x00not-lz4-at-all")
    txt = TxtTokLmdb(txt_dir)
    assert txt["a"]["input_ids"] == [5, 6, 7]
    with pytest.raises(DbError, match=r"txt\.db.*'b'"):
        txt["b"]


def test_missing_key_names_db_and_key(tmp_path):
    txt_dir, img_dir = _tiny_dbs(tmp_path)
    _put_raw(txt_dir, "a", None)
    with pytest.raises(DbError, match=r"missing key 'a'"):
        TxtTokLmdb(txt_dir)["a"]
    img = DetectFeatLmdb(img_dir, 0.2, 3, 1)
    with pytest.raises(DbError, match="nope.npz"):
        img.get_dump("nope.npz")


def test_length_mismatch_with_id2len(tmp_path):
    txt_dir, _ = _tiny_dbs(tmp_path)
    import lz4.frame
    import msgpack
    _put_raw(txt_dir, "a", lz4.frame.compress(msgpack.dumps(
        {"input_ids": [5, 6, 7, 8, 9], "img_fname": "i0.npz"})))
    with pytest.raises(DbError, match="id2len"):
        TxtTokLmdb(txt_dir)["a"]


def test_nan_features_rejected(tmp_path):
    bad = np.random.default_rng(1).random((3, 16)).astype(np.float32)
    bad[0, 3] = np.nan
    _, img_dir = _tiny_dbs(tmp_path, feats=bad)
    img = DetectFeatLmdb(img_dir, 0.2, 3, 1)
    img.get_dump("i0.npz")
    with pytest.raises(DbError, match=r"'i1.npz'.*NaN"):
        img.get_dump("i1.npz")


def test_inf_and_shape_mismatch_rejected(tmp_path):
    bb = np.random.default_rng(1).random((3, 5)).astype(np.float32)
    _, img_dir = _tiny_dbs(tmp_path, norm_bb=bb)
    with pytest.raises(DbError, match="norm_bb must have 6 columns"):
        DetectFeatLmdb(img_dir, 0.2, 3, 1).get_dump("i1.npz")
    feats = np.random.default_rng(1).random((3, 16)).astype(np.float32)
    feats[1, 1] = np.inf
    _, img_dir2 = _tiny_dbs(tmp_path / "x", feats=feats)
    with pytest.raises(DbError, match="NaN or inf"):
        DetectFeatLmdb(img_dir2, 0.2, 3, 1).get_dump("i1.npz")
    _, img_dir3 = _tiny_dbs(tmp_path / "y")
    with pytest.raises(DbError, match="expected 2048"):
        DetectFeatLmdb(img_dir3, 0.2, 3, 1, img_dim=2048).get_dump("i0.npz")


def test_corrupt_npz_record(tmp_path):
    _, img_dir = _tiny_dbs(tmp_path)
    _put_raw(os.path.join(img_dir, "feat_th0.2_max3_min1_compressed"), "i1.npz", b"PK\x03garbage")
    with pytest.raises(DbError, match=r"corrupt record 'i1.npz'"):
        DetectFeatLmdb(img_dir, 0.2, 3, 1).get_dump("i1.npz")


def test_missing_db_dir(tmp_path):
    with pytest.raises(DbError, match="id2len.json"):
        TxtTokLmdb(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- batches
def _check_common(batch, items):
    b = len(items)
    tls = [len(x["input_ids"]) for x in items]
    nbbs = [x["img_feat"].size(0) for x in items]
    L, N = max(tls), max(nbbs)
    assert batch["input_ids"].shape == (b, L)
    assert batch["img_feat"].shape[:2] == (b, N)
    assert batch["position_ids"].tolist() == [list(range(L))]
    assert batch["attn_masks"].shape == (b, max(t + n for t, n in zip(tls, nbbs)))
    for i in range(b):
        assert batch["attn_masks"][i].sum() == tls[i] + nbbs[i]
        assert (batch["attn_masks"][i, :tls[i] + nbbs[i]] == 1).all()
        # gathering the padded [text L | image N] layout gives the compact sequence
        layout = list(range(tls[i])) + [L + j for j in range(nbbs[i])]
        assert batch["gather_index"][i, :tls[i] + nbbs[i]].tolist() == layout
        assert (batch["img_pos_feat"][i, nbbs[i]:] == 0).all()


def test_mlm_batch(syn):
    ds = MlmDataset(*_dbs(syn), seed=1)
    items = [ds[i] for i in range(9)]
    batch = mlm_collate(items)
    _check_common(batch, items)
    lab = batch["txt_labels"]
    assert (lab[:, 0] == -1).all()
    for i, x in enumerate(items):
        tl = len(x["input_ids"])
        assert lab[i, tl - 1] == -1 and (lab[i, tl:] == -1).all()
        assert (lab[i, :tl] != -1).sum() >= 1
        orig = ds.txt_db[ds.ids[i]]["input_ids"]
        sel = lab[i, 1:tl - 1]
        assert sel[sel != -1].tolist() == [o for o, s in zip(orig, sel.tolist()) if s != -1]
        torch.testing.assert_close(batch["img_feat"][i, :x["img_feat"].size(0)], x["img_feat"])
    assert "img_masks" not in batch, "MLM never masks regions (conditional masking)"


def test_mrfr_and_mrc_batches(syn):
    txt, img = _dbs(syn)
    for cls, coll in ((MrfrDataset, mrfr_collate), (MrcDataset, mrc_collate)):
        ds = cls(txt, img, seed=2, mask_prob=0.3)
        items = [ds[i] for i in range(7)]
        batch = coll(items)
        _check_common(batch, items)
        masks = batch["img_masks"]
        assert masks.dtype == torch.bool and (masks.sum(1) >= 1).all()
        for i, x in enumerate(items):
            tl, n = len(x["input_ids"]), x["img_feat"].size(0)
            assert batch["input_ids"][i, :tl].tolist() == txt.combine_inputs(
                txt[ds.ids[i]]["input_ids"]), "MRM never masks text"
            assert batch["img_mask_tgt"][i, :tl].sum() == 0
            assert batch["img_mask_tgt"][i, tl:tl + n].tolist() == masks[i, :n].tolist()
            assert (batch["img_feat"][i][masks[i]] == 0).all()
        orig = torch.nn.utils.rnn.pad_sequence([x["img_feat"] for x in items], batch_first=True)
        if cls is MrfrDataset:
            torch.testing.assert_close(batch["feat_targets"], orig[masks])
            assert batch["feat_targets"].abs().sum() > 0
        else:
            soft = torch.nn.utils.rnn.pad_sequence([x["img_soft_label"] for x in items],
                                                   batch_first=True)
            torch.testing.assert_close(batch["label_targets"], soft[masks])


def test_itm_batch_and_ot_inputs(syn):
    txt, img = _dbs(syn)
    ds = ItmDataset(txt, img, neg_prob=0.5, seed=4)
    assert 0.3 < ds.labels.mean() < 0.7
    for i in range(len(ds)):
        assert (ds.train_imgs[i] == ds.img_fnames[i]) == bool(ds.labels[i])
    items = [ds[i] for i in range(11)]
    batch = itm_ot_collate(items)
    _check_common(batch, items)
    assert batch["targets"].tolist() == [int(ds.labels[i]) for i in range(11)]
    ot = batch["ot_inputs"]
    tls = [len(x["input_ids"]) for x in items]
    nbbs = [x["img_feat"].size(0) for x in items]
    L = max(tls)
    for i in range(11):
        sc = ot["ot_scatter"][i]
        # compact text -> slots [0, tl); compact regions -> slots [L, L + nbb)
        assert sc[:tls[i]].tolist() == list(range(tls[i]))
        assert sc[tls[i]:tls[i] + nbbs[i]].tolist() == list(range(L, L + nbbs[i]))
        assert ot["txt_pad"][i].tolist() == [0] * tls[i] + [1] * (L - tls[i])
        assert ot["img_pad"][i].tolist() == [0] * nbbs[i] + [1] * (max(nbbs) - nbbs[i])
    assert ot["scatter_max"] == int(ot["ot_scatter"].max())
    ds.set_epoch(1)
    assert ds.labels.tolist() != ItmDataset(txt, img, neg_prob=0.5, seed=4).labels.tolist()


def test_masks_reproducible_by_seed_and_epoch(syn):
    txt, img = _dbs(syn)
    a, b, c = (MlmDataset(txt, img, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a[i]["txt_labels"], b[i]["txt_labels"]) for i in range(20))
    assert any(not torch.equal(a[i]["txt_labels"], c[i]["txt_labels"]) for i in range(20))
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["txt_labels"], b[i]["txt_labels"]) for i in range(20))


# ----------------------------------------------------------------------------- sampler
def test_token_bucket_sampler():
    rng = np.random.default_rng(0)
    lens = rng.integers(5, 60, size=301).tolist()
    s = TokenBucketSampler(bucket_size=64, batch_size=400, droplast=False, size_multiple=4, seed=1)
    batches = s.batches(lens, 0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(301))
    for b in batches:
        assert max(lens[i] for i in b) * len(b) <= 400
    full = [b for b in batches if len(b) % 4 == 0]
    assert len(full) >= len(batches) - 64, "all but the last batch of each bucket are full groups"
    assert s.batches(lens, 0) == batches and s.batches(lens, 1) != batches
    dl = TokenBucketSampler(64, 400, droplast=True, size_multiple=4, seed=1).batches(lens, 0)
    assert len(dl) < len(batches)
    with pytest.raises(ValueError, match="too small"):
        TokenBucketSampler(64, 50, size_multiple=4).batches(lens, 0)


def test_rank_shards_are_disjoint(syn):
    txt, img = _dbs(syn)
    shards = [set(MlmDataset(txt, img, rank=r, world_size=3).ids) for r in range(3)]
    assert sum(len(s) for s in shards) == len(txt)
    assert set.union(*shards) == set(txt.id2len)
    assert all(not (shards[i] & shards[j]) for i in range(3) for j in range(i + 1, 3))


def _cfg(syn_root_cache):
    return {"synthetic": {**SPEC.__dict__}, "conf_th": SPEC.conf_th, "max_bb": SPEC.max_bb,
            "min_bb": SPEC.min_bb, "train_batch_size": 256, "bucket_size": 64, "seed": 11,
            "itm_ot_lambda": 0.1,
            "train_datasets": [{"name": "syn", "db": ["synthetic:train"],
                                "img": ["synthetic:img"], "tasks": ["itm", "mlm", "mrfr", "mrckl"],
                                "mix_ratio": [3, 2, 1, 1]}]}


def test_meta_loader_mixing_same_on_all_ranks_and_resume(syn, monkeypatch):
    monkeypatch.setenv("UNITER_FAST_CACHE", os.path.dirname(syn["root"]))
    cfg = _cfg(syn)
    ml0 = create_train_loader(cfg, rank=0, world_size=2)
    ml1 = create_train_loader(cfg, rank=1, world_size=2)
    names0, names1 = [], []
    for _ in range(70):
        n0, b0 = ml0.next()
        n1, b1 = ml1.next()
        names0.append(n0)
        names1.append(n1)
    assert names0 == names1, "all ranks train the same task at every step"
    assert not torch.equal(b0["input_ids"][:1], b1["input_ids"][:1]) or \
        b0["input_ids"].shape != b1["input_ids"].shape
    # mixing frequencies follow the ratios (3:2:1:1), checked on many draws
    ml = MetaLoader({n: (None, r) for n, r in zip("abcd", [3, 2, 1, 1])}, seed=0)
    cnt = collections.Counter(ml.rng.choice(ml.pool) for _ in range(7000))
    for n, r in zip("abcd", [3, 2, 1, 1]):
        assert abs(cnt[n] / 7000 - r / 7) < 0.025
    # resume: state after k steps reproduces the following batches exactly
    state = json.loads(json.dumps(ml0.state_dict()))
    expect = [ml0.next() for _ in range(25)]
    fresh = create_train_loader(cfg, rank=0, world_size=2)
    fresh.load_state_dict(state)
    got = [fresh.next() for _ in range(25)]
    for (na, ba), (nb, bb) in zip(expect, got):
        assert na == nb
        assert torch.equal(ba["input_ids"], bb["input_ids"])
        assert torch.equal(ba["img_feat"], bb["img_feat"])


def test_task_loader_epochs_cover_shard(syn):
    txt, img = _dbs(syn)
    ds = MlmDataset(txt, img)
    tl = TaskLoader(ds, mlm_collate, TokenBucketSampler(64, 10_000, droplast=False, seed=0))
    seen = 0
    while tl.epoch == 0:
        b = tl.next_batch()
        if tl.epoch == 0:
            seen += b["input_ids"].size(0)
    assert seen == len(ds)
