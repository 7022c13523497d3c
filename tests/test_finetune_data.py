"""Fine-tuning data (VQA, VE, NLVR2): datasets and collates over dbs written in UNITER's
format by the real writers, malformed records, the shipped answer vocabulary, sharding,
token buckets, and a batch through the matching model."""
import json
import os

import numpy as np
import pytest
import torch

import uniter_fast
from uniter_fast import UniterConfig
from uniter_fast.data import (
    ANS2LABEL_PATH,
    VE_ENT2IDX,
    DbError,
    DetectFeatLmdb,
    Nlvr2PairedDataset,
    Nlvr2PairedEvalDataset,
    Nlvr2TripletDataset,
    Nlvr2TripletEvalDataset,
    TaskLoader,
    TokenBucketSampler,
    TxtTokLmdb,
    VeDataset,
    VeEvalDataset,
    VqaDataset,
    VqaEvalDataset,
    load_ans2label,
    nlvr2_paired_collate,
    nlvr2_paired_eval_collate,
    nlvr2_triplet_collate,
    nlvr2_triplet_eval_collate,
    ve_collate,
    ve_eval_collate,
    vqa_collate,
    vqa_eval_collate,
    write_img_db,
    write_txt_db,
)
from uniter_fast.model import (
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    UniterForVisualQuestionAnswering,
)

META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [106, 128]}  # fits uniter-tiny's 128 words
IMG_DIM, CONF_TH, MIN_BB, MAX_BB = 16, 0.2, 2, 6
BATCH_KEYS = {"input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
              "gather_index", "targets"}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        k = 8
        x1, y1 = rng.random(k) * 0.5, rng.random(k) * 0.5
        w, h = rng.random(k) * 0.5, rng.random(k) * 0.5
        bb = np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float32)
        conf = np.sort(rng.random(k))[::-1].astype(np.float32)
        out[f"img{i}.npz"] = {"features": rng.standard_normal((k, IMG_DIM)).astype(np.float32),
                              "norm_bb": bb, "conf": conf,
                              "soft_labels": rng.dirichlet(np.ones(5), k).astype(np.float32)}
    return out


@pytest.fixture(scope="module")
def img_db(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("img"))
    dumps = _images(6)
    nbb = write_img_db(d, dumps, CONF_TH, MAX_BB, MIN_BB)
    db = DetectFeatLmdb(d, CONF_TH, MAX_BB, MIN_BB, img_dim=IMG_DIM)
    return db, dumps, nbb


def _txt(tmp_path, name, records):
    path = str(tmp_path / name)
    write_txt_db(path, records, META)
    return TxtTokLmdb(path, -1)


def _ids(rng, n):
    return [int(t) for t in rng.integers(106, 128, n)]


def vqa_records(n=7, num_answers=3129, seed=0, with_target=True):
    rng = np.random.default_rng(seed)
    recs = {}
    for i in range(n):
        k = int(rng.integers(0, 4))              # 0 = no answer in the vocabulary
        labels = sorted(int(x) for x in rng.choice(num_answers, k, replace=False))
        scores = [float(rng.choice([0.3, 0.6, 0.9, 1.0])) for _ in labels]
        rec = {"question_id": 1000 + i, "input_ids": _ids(rng, int(rng.integers(1, 9))),
               "img_fname": f"img{i % 6}.npz"}
        if with_target:
            rec["target"] = {"labels": labels, "scores": scores}
        recs[str(1000 + i)] = rec
    return recs


def expected_target(rec, n):
    t = torch.zeros(n)
    for lab, s in zip(rec["target"]["labels"], rec["target"]["scores"]):
        t[lab] = s
    return t


def check_common(batch, items, txt_lens, nbbs, cls_=101, sep=102):
    """The encoder keys of a UNITER batch, checked from first principles."""
    b = len(txt_lens)
    assert batch["input_ids"].shape == (b, max(txt_lens))
    assert torch.equal(batch["position_ids"], torch.arange(max(txt_lens))[None])
    assert batch["img_feat"].shape == (b, max(nbbs), IMG_DIM)
    assert batch["img_pos_feat"].shape == (b, max(nbbs), 7)
    joint = [t + n for t, n in zip(txt_lens, nbbs)]
    assert batch["attn_masks"].shape == (b, max(joint))
    for i, (tl, nb) in enumerate(zip(txt_lens, nbbs)):
        ids = batch["input_ids"][i]
        assert ids[0] == cls_ and ids[tl - 1] == sep and (ids[tl:] == 0).all()
        assert batch["attn_masks"][i, :tl + nb].all() and not batch["attn_masks"][i, tl + nb:].any()
        g = batch["gather_index"][i]
        assert torch.equal(g[:tl], torch.arange(tl))
        assert torch.equal(g[tl:tl + nb], max(txt_lens) + torch.arange(nb))
        assert (batch["img_feat"][i, nb:] == 0).all()
        pos = batch["img_pos_feat"][i, :nb]
        torch.testing.assert_close(pos[:, 6], pos[:, 4] * pos[:, 5])


# ----------------------------------------------------------------------------- answers
def test_shipped_answer_vocabulary():
    a2l = load_ans2label()
    assert len(a2l) == 3129 and sorted(a2l.values()) == list(range(3129))
    assert {"yes", "no", "2", "red"} <= set(a2l)
    assert os.path.dirname(ANS2LABEL_PATH) == os.path.dirname(uniter_fast.data.__file__)


def test_bad_answer_vocabulary(tmp_path):
    p = tmp_path / "a2l.json"
    p.write_text(json.dumps({"yes": 0, "no": 2}))
    with pytest.raises(ValueError, match="ids 0..n-1"):
        load_ans2label(str(p))
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read answer vocabulary"):
        load_ans2label(str(p))


# ----------------------------------------------------------------------------- VQA
def test_vqa_dataset_and_collate(tmp_path, img_db):
    db, dumps, nbb = img_db
    recs = vqa_records()
    txt = _txt(tmp_path, "vqa_train.db", recs)
    ds = VqaDataset(3129, txt, db)
    assert ds.lens == [len(recs[i]["input_ids"]) + nbb[recs[i]["img_fname"]] for i in ds.ids]
    items = [ds[i] for i in range(len(ds))]
    for i, it in zip(ds.ids, items):
        rec = recs[i]
        assert it["input_ids"].tolist() == [101] + rec["input_ids"] + [102]
        n = nbb[rec["img_fname"]]
        feat = torch.tensor(dumps[rec["img_fname"]]["features"][:n].astype(np.float16)
                            .astype(np.float32))
        assert torch.equal(it["img_feat"], feat)
        assert torch.equal(it["targets"], expected_target(rec, 3129))
        assert it["targets"].dtype == torch.float32
    batch = vqa_collate(items)
    assert set(batch) == BATCH_KEYS
    check_common(batch, items, [len(x["input_ids"]) for x in items],
                 [x["img_feat"].size(0) for x in items])
    assert batch["targets"].shape == (len(items), 3129)
    assert batch["attn_masks"].dtype == torch.long
    # eval: + qids, same tensors
    ev = VqaEvalDataset(3129, txt, db)
    eb = vqa_eval_collate([ev[i] for i in range(len(ev))])
    assert set(eb) == BATCH_KEYS | {"qids"} and eb["qids"] == ds.ids
    assert all(torch.equal(eb[k], batch[k]) for k in BATCH_KEYS)


def test_vqa_eval_without_targets(tmp_path, img_db):
    db, _, _ = img_db
    txt = _txt(tmp_path, "vqa_test.db", vqa_records(4, with_target=False))
    ev = VqaEvalDataset(3129, txt, db)
    batch = vqa_eval_collate([ev[i] for i in range(4)])
    assert batch["targets"] is None and len(batch["qids"]) == 4
    with pytest.raises(DbError, match=r"vqa_test.db: record '1000' has no 'target'"):
        VqaDataset(3129, txt, db)[0]
    items = [ev[0], {**ev[1], "targets": torch.zeros(3129)}]
    with pytest.raises(ValueError, match="mixed labelled and unlabelled"):
        vqa_eval_collate(items)
    with pytest.raises(ValueError, match="need targets"):
        vqa_collate([ev[0]])


@pytest.mark.parametrize("target,msg", [
    ({"labels": [3129], "scores": [1.0]}, r"label out of range \[0, 3129\)"),
    ({"labels": [-1], "scores": [1.0]}, "label out of range"),
    ({"labels": [1, 2], "scores": [1.0]}, "lists of one length"),
    ({"labels": [1, 1], "scores": [1.0, 0.3]}, "labels repeat"),
    ({"labels": [1], "scores": [1.5]}, r"scores must be numbers in \[0, 1\]"),
    ({"labels": [1], "scores": [float("nan")]}, "scores must be numbers"),
    ({"labels": [1]}, "'labels' and 'scores'"),
    (3, "must be a dict"),
    (None, "has no 'target'"),
])
def test_vqa_malformed_targets_name_db_and_key(tmp_path, img_db, target, msg):
    db, _, _ = img_db
    recs = vqa_records(3)
    recs["1001"]["target"] = target
    txt = _txt(tmp_path, "bad_vqa.db", recs)
    for cls in (VqaDataset, VqaEvalDataset):
        ds = cls(3129, txt, db)
        ds[0]
        if target is None and cls is VqaEvalDataset:
            assert ds[1]["targets"] is None     # unlabelled is fine for evaluation
            continue
        with pytest.raises(DbError, match=msg) as e:
            ds[1]
        assert "bad_vqa.db" in str(e.value) and "'1001'" in str(e.value)


def test_vqa_record_image_disagreeing_with_txt2img(tmp_path, img_db):
    db, _, _ = img_db
    recs = vqa_records(2)
    path = str(tmp_path / "vqa_mismatch.db")
    write_txt_db(path, recs, META)
    t2i = json.load(open(os.path.join(path, "txt2img.json")))
    t2i["1000"] = "img5.npz"
    json.dump(t2i, open(os.path.join(path, "txt2img.json"), "w"))
    ds = VqaDataset(3129, TxtTokLmdb(path, -1), db)
    with pytest.raises(DbError, match="names image.*txt2img.json says 'img5.npz'"):
        ds[0]


def test_vqa_sharding_tokens_buckets_and_model(tmp_path, img_db):
    db, _, _ = img_db
    recs = vqa_records(20, num_answers=11, seed=3)
    txt = _txt(tmp_path, "vqa_small.db", recs)
    shards = [VqaDataset(11, txt, db, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for s in shards for i in s.ids) == sorted(recs)
    assert not set(shards[0].ids) & set(shards[1].ids)
    ds = VqaDataset(11, txt, db)
    loader = TaskLoader(ds, vqa_collate, TokenBucketSampler(8, 64, droplast=False, size_multiple=2))
    torch.manual_seed(0)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    model = UniterForVisualQuestionAnswering(cfg, IMG_DIM, 11)
    seen = []
    for batch in loader.epoch_batches(0):
        assert int(batch["attn_masks"].size(1)) * batch["input_ids"].size(0) <= 64
        loss = model(batch)
        assert loss.shape == (batch["input_ids"].size(0), 11) and torch.isfinite(loss).all()
        seen += batch["input_ids"][:, 1].tolist()
    assert len(seen) == len(ds)          # one epoch covers every example once (no drop)
    assert loader.next_batch()["targets"].shape[1] == 11
    with pytest.raises(ValueError, match="num_answers"):
        VqaDataset(0, txt, db)


# ----------------------------------------------------------------------------- VE
def test_ve_dataset_and_collate(tmp_path, img_db):
    db, _, _ = img_db
    rng = np.random.default_rng(1)
    labels = ["entailment", "contradiction", "neutral", "entailment", "neutral"]
    recs = {f"ve{i}": {"input_ids": _ids(rng, 3 + i), "img_fname": f"img{i}.npz",
                       "target": {"labels": [VE_ENT2IDX[lab]], "scores": [1.0]}}
            for i, lab in enumerate(labels)}
    txt = _txt(tmp_path, "ve_train.db", recs)
    ds = VeDataset(txt, db)
    batch = ve_collate([ds[i] for i in range(len(ds))])
    assert set(batch) == BATCH_KEYS and batch["targets"].shape == (5, 3)
    assert batch["targets"].argmax(1).tolist() == [VE_ENT2IDX[lab] for lab in labels]
    assert batch["targets"].sum(1).tolist() == [1.0] * 5
    eb = ve_eval_collate([VeEvalDataset(txt, db)[i] for i in range(5)])
    assert eb["qids"] == ds.ids and torch.equal(eb["targets"], batch["targets"])
    recs["ve2"]["target"] = {"labels": [3], "scores": [1.0]}
    bad = VeDataset(_txt(tmp_path, "ve_bad.db", recs), db)
    with pytest.raises(DbError, match=r"ve_bad.db: record 've2'.*out of range \[0, 3\)"):
        bad[2]


# ----------------------------------------------------------------------------- NLVR2
def nlvr2_records(n=6, seed=0, labelled=True):
    rng = np.random.default_rng(seed)
    recs = {}
    for i in range(n):
        pair = [f"img{(2 * i) % 6}.npz", f"img{(2 * i + 1) % 6}.npz"]
        recs[f"dev-{i}-0-{i % 2}"] = {
            "identifier": f"dev-{i}-0-{i % 2}", "input_ids": _ids(rng, int(rng.integers(1, 8))),
            "img_fname": pair, "target": int(rng.integers(0, 2)) if labelled else None}
    return recs


def test_nlvr2_db_writer_keeps_pairs(tmp_path):
    recs = nlvr2_records()
    path = str(tmp_path / "nlvr2_dev.db")
    write_txt_db(path, recs, META)
    t2i = json.load(open(os.path.join(path, "txt2img.json")))
    i2t = json.load(open(os.path.join(path, "img2txts.json")))
    for id_, rec in recs.items():
        assert t2i[id_] == rec["img_fname"]
        assert all(id_ in i2t[f] for f in rec["img_fname"])
    txt = TxtTokLmdb(path, -1)
    assert txt[next(iter(recs))]["img_fname"] == recs[next(iter(recs))]["img_fname"]
    with pytest.raises(DbError, match="img_fname must be an image name or a non-empty list"):
        write_txt_db(str(tmp_path / "x.db"), {"a": {"input_ids": [1], "img_fname": []}}, META)


@pytest.mark.parametrize("use_img_type", [True, False])
def test_nlvr2_paired(tmp_path, img_db, use_img_type):
    db, _, nbb = img_db
    recs = nlvr2_records()
    txt = _txt(tmp_path, "nlvr2_train.db", recs)
    ds = Nlvr2PairedDataset(txt, db, use_img_type)
    assert ds.lens == [2 * len(recs[i]["input_ids"]) + sum(nbb[f] for f in recs[i]["img_fname"])
                       for i in ds.ids]
    items = [ds[i] for i in range(len(ds))]
    batch = nlvr2_paired_collate(items)
    assert set(batch) == BATCH_KEYS | {"img_type_ids"}
    rows = [side for it in items for side in it["inputs"]]
    txt_lens = [len(recs[i]["input_ids"]) + 2 for i in ds.ids for _ in range(2)]
    nbbs = [nbb[f] for i in ds.ids for f in recs[i]["img_fname"]]
    assert [r["img_feat"].size(0) for r in rows] == nbbs
    check_common(batch, rows, txt_lens, nbbs)
    assert torch.equal(batch["input_ids"][0::2], batch["input_ids"][1::2])  # same text per pair
    assert batch["targets"].tolist() == [recs[i]["target"] for i in ds.ids]
    assert batch["targets"].dtype == torch.long
    if use_img_type:
        t = batch["img_type_ids"]
        assert t.shape == (2 * len(ds), max(nbbs))
        for r, n in enumerate(nbbs):
            assert (t[r, :n] == 1 + r % 2).all() and (t[r, n:] == 0).all()
    else:
        assert batch["img_type_ids"] is None
    ev = Nlvr2PairedEvalDataset(txt, db, use_img_type)
    eb = nlvr2_paired_eval_collate([ev[i] for i in range(len(ev))])
    assert eb["qids"] == ds.ids and torch.equal(eb["targets"], batch["targets"])
    assert torch.equal(eb["img_feat"], batch["img_feat"])


def test_nlvr2_triplet(tmp_path, img_db):
    db, dumps, nbb = img_db
    recs = nlvr2_records(seed=1)
    txt = _txt(tmp_path, "nlvr2_trip.db", recs)
    ds = Nlvr2TripletDataset(txt, db)
    assert ds.lens == [len(recs[i]["input_ids"]) + sum(nbb[f] for f in recs[i]["img_fname"])
                       for i in ds.ids]
    items = [ds[i] for i in range(len(ds))]
    batch = nlvr2_triplet_collate(items)
    assert set(batch) == BATCH_KEYS | {"img_type_ids"}
    nbbs = [sum(nbb[f] for f in recs[i]["img_fname"]) for i in ds.ids]
    check_common(batch, items, [len(recs[i]["input_ids"]) + 2 for i in ds.ids], nbbs)
    for r, id_ in enumerate(ds.ids):
        left, right = recs[id_]["img_fname"]
        n1, n2 = nbb[left], nbb[right]
        want = np.concatenate([dumps[left]["features"][:n1], dumps[right]["features"][:n2]])
        torch.testing.assert_close(batch["img_feat"][r, :n1 + n2],
                                   torch.tensor(want.astype(np.float16).astype(np.float32)))
        assert batch["img_type_ids"][r, :n1 + n2].tolist() == [1] * n1 + [2] * n2
    assert batch["targets"].shape == (len(ds),)
    eb = nlvr2_triplet_eval_collate([Nlvr2TripletEvalDataset(txt, db)[i] for i in range(len(ds))])
    assert eb["qids"] == ds.ids


def test_nlvr2_unlabelled_and_malformed(tmp_path, img_db):
    db, _, _ = img_db
    txt = _txt(tmp_path, "nlvr2_test.db", nlvr2_records(4, labelled=False))
    for ev_cls, coll in ((Nlvr2PairedEvalDataset, nlvr2_paired_eval_collate),
                         (Nlvr2TripletEvalDataset, nlvr2_triplet_eval_collate)):
        ev = ev_cls(txt, db)
        assert coll([ev[i] for i in range(4)])["targets"] is None
    with pytest.raises(DbError, match=r"nlvr2_test.db: record 'dev-0-0-0' has no 'target'"):
        Nlvr2PairedDataset(txt, db)[0]
    # one image where two are needed: refused when the dataset is built
    recs = nlvr2_records(3)
    recs["dev-1-0-1"]["img_fname"] = "img0.npz"
    bad = _txt(tmp_path, "nlvr2_one_img.db", recs)
    for cls in (Nlvr2PairedDataset, Nlvr2TripletEvalDataset):
        with pytest.raises(DbError, match=r"nlvr2_one_img.db: record 'dev-1-0-1' has image\(s\) "
                                          r"'img0.npz'; NLVR2 needs a pair"):
            cls(bad, db)
    recs = nlvr2_records(3)
    recs["dev-1-0-1"]["img_fname"] = ["img0.npz", "img1.npz", "img2.npz"]
    with pytest.raises(DbError, match="NLVR2 needs a pair"):
        Nlvr2TripletDataset(_txt(tmp_path, "nlvr2_three.db", recs), db)
    for k, target in enumerate((2, -1, "True", 1.0, True)):
        recs = nlvr2_records(3)
        recs["dev-2-0-0"]["target"] = target
        ds = Nlvr2PairedDataset(_txt(tmp_path, f"nlvr2_target{k}.db", recs), db)
        with pytest.raises(DbError, match=r"record 'dev-2-0-0': target must be 0 \(False\) or 1"):
            ds[2]
    # an image the image db does not have
    recs = nlvr2_records(3)
    recs["dev-0-0-0"]["img_fname"] = ["img0.npz", "nope.npz"]
    with pytest.raises(DbError, match="no box count for image 'nope.npz'"):
        Nlvr2PairedDataset(_txt(tmp_path, "nlvr2_missing_img.db", recs), db)
    with pytest.raises(ValueError, match="need targets"):
        nlvr2_paired_collate([Nlvr2PairedEvalDataset(txt, db)[0]])


@pytest.mark.parametrize("cls,ds_cls,coll", [
    (UniterForNlvr2Paired, Nlvr2PairedDataset, nlvr2_paired_collate),
    (UniterForNlvr2PairedAttn, Nlvr2PairedDataset, nlvr2_paired_collate),
    (UniterForNlvr2Triplet, Nlvr2TripletDataset, nlvr2_triplet_collate)])
def test_nlvr2_batches_through_models(tmp_path, img_db, cls, ds_cls, coll):
    db, _, _ = img_db
    txt = _txt(tmp_path, "nlvr2_m.db", nlvr2_records(5, seed=4))
    ds = ds_cls(txt, db)
    loader = TaskLoader(ds, coll, TokenBucketSampler(8, 400, size_multiple=2))
    batch = loader.next_batch()
    torch.manual_seed(0)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    model = cls(cfg, IMG_DIM)
    model.init_type_embedding()
    loss = model(batch)
    assert loss.shape == batch["targets"].shape and torch.isfinite(loss).all()
    assert model(batch, compute_loss=False).shape == (batch["targets"].size(0), 2)
