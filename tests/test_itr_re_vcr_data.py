"""Retrieval, referring-expression and VCR datasets on UNITER-format dbs written by the
package's writers: items and batches as the original builds them (checked against plain
re-statements of the original's layouts), seeded negatives, sharding, malformed records
(errors naming db and key), RE image dbs whose records hold fewer boxes than num_bb, the
RE IoU accuracy and the VCR metrics / submission file."""
import csv
import math

import lz4.frame
import msgpack
import numpy as np
import oracle_itr_re_vcr as orc
import pytest
import torch
from test_data import _put_raw

import uniter_fast
from uniter_fast import UniterConfig, ops
from uniter_fast.data import DbError, DetectFeatLmdb, TxtTokLmdb, write_img_db, write_txt_db
from uniter_fast.data.itm import (
    ItmEvalDataset,
    ItmRankDataset,
    ItmRankDatasetHardNegFromImage,
    ItmRankDatasetHardNegFromText,
    ItmValDataset,
    itm_eval_collate,
    itm_rank_collate,
    itm_rank_hn_collate,
    itm_val_collate,
)
from uniter_fast.data.re import (
    ReDataset,
    ReEvalDataset,
    ReTxtTokLmdb,
    compute_iou,
    re_collate,
    re_det_img_name,
    re_eval_collate,
    re_gt_img_name,
    write_re_txt_db,
)
from uniter_fast.data.vcr import (
    VcrDataset,
    VcrEvalDataset,
    VcrTxtTokLmdb,
    vcr_collate,
    vcr_eval_collate,
    write_vcr_txt_db,
)
from uniter_fast.eval.re import re_eval_batch
from uniter_fast.eval.vcr import VcrEvaluator, qar_scores, vcr_submission_rows, write_vcr_submission
from uniter_fast.model import (
    UniterForImageTextRetrievalHardNeg,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
)

D = 16                  # feature dim of the test image dbs
META = {"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 60], "bert": "t"}
CLS, SEP = META["CLS"], META["SEP"]


def _img_dumps(names_nbb, seed, conf=True):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in names_nbb.items():
        d = {"features": rng.random((n, D)).astype(np.float32),
             "norm_bb": rng.random((n, 6)).astype(np.float32)}
        if conf:   # the first n - 1 boxes above conf_th 0.2 (nbb = n - 1, at least 1)
            d["conf"] = np.array([0.9] * (n - 1) + [0.1], np.float32)
        out[name] = d
    return out


def tiny_cfg():
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    return cfg


# ============================================================================= ITR
@pytest.fixture(scope="module")
def itm(tmp_path_factory):
    root = tmp_path_factory.mktemp("itm")
    rng = np.random.default_rng(0)
    n_caps = [2, 3, 1, 2, 2, 2, 2]
    recs = {}
    for j, k in enumerate(n_caps):
        for c in range(k):
            recs[f"t{j}_{c}"] = {"input_ids": rng.integers(5, 60, rng.integers(2, 9)).tolist(),
                                 "img_fname": f"img{j}.npz"}
    write_txt_db(str(root / "txt.db"), recs, META)
    write_img_db(str(root / "img"), _img_dumps({f"img{j}.npz": 3 + j % 4 for j in range(7)}, 1),
                 conf_th=0.2, max_bb=6, min_bb=1)
    return TxtTokLmdb(str(root / "txt.db"), -1), DetectFeatLmdb(str(root / "img"), 0.2, 6, 1), recs


def _row_layout_ok(batch, r, tl, nbb):
    """Row r of a batch: attn 1 on tl + nbb positions; gather_index compacts
    [text (padded to L) | regions] into [text; regions]."""
    L = batch["input_ids"].size(1)
    assert batch["attn_masks"][r].tolist()[:tl + nbb] == [1] * (tl + nbb)
    assert batch["attn_masks"][r, tl + nbb:].sum() == 0
    g = batch["gather_index"][r].tolist()
    assert g[:tl] == list(range(tl)) and g[tl:tl + nbb] == list(range(L, L + nbb))


def test_itm_rank_dataset_items_batches_and_negatives(itm):
    txt_db, img_db, recs = itm
    ds = ItmRankDataset(txt_db, img_db, neg_sample_size=2, seed=3)
    assert len(ds) == len(recs)
    for i in range(len(ds)):
        pairs = ds.id_pairs(i)
        gt_t, gt_i = pairs[0]
        assert gt_t == ds.ids[i] and gt_i == recs[gt_t]["img_fname"]
        neg_imgs = [p[1] for p in pairs[1:3]]
        neg_txts = [p[0] for p in pairs[3:]]
        assert all(p[0] == gt_t for p in pairs[1:3]) and all(p[1] == gt_i for p in pairs[3:])
        assert gt_i not in neg_imgs and len(set(neg_imgs)) == 2
        assert not set(neg_txts) & set(ds.img2txts[gt_i]) and len(set(neg_txts)) == 2
    items = [ds[i] for i in (0, 4)]
    batch = itm_rank_collate(items)
    assert set(batch) == {"input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
                          "gather_index", "sample_size"}
    assert batch["sample_size"] == 5 and batch["input_ids"].size(0) == 10
    rows = [p for it in items for p in it]
    for r, p in enumerate(rows):
        tl, nbb = len(p["input_ids"]), p["img_feat"].size(0)
        assert batch["input_ids"][r, :tl].tolist() == p["input_ids"].tolist()
        assert torch.equal(batch["img_feat"][r, :nbb], p["img_feat"])
        _row_layout_ok(batch, r, tl, nbb)
    # text rows are [CLS] caption [SEP] of the caption the pair names
    t0, _ = ds.id_pairs(0)[3]
    assert items[0][3]["input_ids"].tolist() == [CLS] + recs[t0]["input_ids"] + [SEP]
    # the image rows are the db's records, boxes as [x1, y1, x2, y2, w, h, w*h]
    f, bb = img_db[ds.id_pairs(0)[1][1]]
    assert torch.equal(items[0][1]["img_feat"], torch.tensor(f))
    assert torch.allclose(items[0][1]["img_pos_feat"][:, 6], torch.tensor(bb[:, 4] * bb[:, 5]))
    with pytest.raises(ValueError, match="groups of different sizes"):
        itm_rank_collate([items[0], items[1][:3]])


def test_itm_negatives_seeded_resumable_and_sharded(itm):
    txt_db, img_db, _ = itm
    a = ItmRankDataset(txt_db, img_db, neg_sample_size=2, seed=5)
    b = ItmRankDataset(txt_db, img_db, neg_sample_size=2, seed=5)
    assert [a.id_pairs(i) for i in range(len(a))] == [b.id_pairs(i) for i in range(len(b))]
    e0 = [a.id_pairs(i) for i in range(len(a))]
    a.set_epoch(1)
    e1 = [a.id_pairs(i) for i in range(len(a))]
    assert e0 != e1
    b.set_epoch(1)      # a resumed run at epoch 1 draws what the uninterrupted one drew
    assert [b.id_pairs(i) for i in range(len(b))] == e1
    # a rank draws its negatives from its own shard ("images partitioned by rank")
    r1 = ItmRankDataset(txt_db, img_db, neg_sample_size=1, seed=5, rank=1, world_size=2)
    assert r1.ids == list(txt_db.id2len)[1::2]
    for i in range(len(r1)):
        for t, img in r1.id_pairs(i):
            assert t in r1.ids and img in r1.img_name_list
    with pytest.raises(ValueError, match="cannot draw 9 negative images"):
        ItmRankDataset(txt_db, img_db, neg_sample_size=9).id_pairs(0)
    with pytest.raises(ValueError, match="neg_sample_size must be an int >= 1"):
        ItmRankDataset(txt_db, img_db, neg_sample_size=0)


def test_itm_hard_negative_batches_and_model(itm):
    txt_db, img_db, recs = itm
    k = 4
    dt = ItmRankDatasetHardNegFromText(txt_db, img_db, neg_sample_size=k, seed=1)
    di = ItmRankDatasetHardNegFromImage(txt_db, img_db, neg_sample_size=k, seed=1)
    i = 3
    bt = itm_rank_hn_collate([dt[i]])
    imgs = dt.img_ids(i)
    assert imgs[0] == recs[dt.ids[i]]["img_fname"] and imgs[0] not in imgs[1:]
    tl = len(recs[dt.ids[i]]["input_ids"]) + 2
    assert bt["input_ids"].shape == (1, tl) and bt["img_feat"].size(0) == k + 1
    for r, img in enumerate(imgs):
        _row_layout_ok(bt, r, tl, img_db.nbb(img))
    bi = itm_rank_hn_collate([di[i]])
    txts = di.txt_ids(i)
    gt_img = recs[di.ids[i]]["img_fname"]
    assert txts[0] == di.ids[i] and not set(txts[1:]) & set(txt_db.img2txts[gt_img])
    nbb = img_db.nbb(gt_img)
    assert bi["img_feat"].shape[:2] == (1, nbb) and bi["input_ids"].size(0) == k + 1
    for r, t in enumerate(txts):
        # image rows gather from the padded text length (the original used the last text's)
        _row_layout_ok(bi, r, len(recs[t]["input_ids"]) + 2, nbb)
    with pytest.raises(ValueError, match="batch_size=1"):
        itm_rank_hn_collate([dt[0], dt[1]])
    # the hard-negative model trains on both batch layouts
    torch.manual_seed(0)
    m = UniterForImageTextRetrievalHardNeg(tiny_cfg(), D, hard_size=2).train()
    for b, d in ((bt, "t"), (bi, "i")):
        b["input_ids"] = b["input_ids"] % 128
        loss = m(b, sample_from=d)
        assert loss.shape == (1, 2) and torch.isfinite(loss).all()


def test_itm_val_and_eval_datasets(itm):
    txt_db, img_db, recs = itm
    val = ItmValDataset(txt_db, img_db, mini_batch_size=4)
    imgs = list(txt_db.img2txts)
    assert val.all_img_ids == imgs
    for i in range(len(val)):
        gt, neg = val._get_batch_ids(i)
        j = imgs.index(gt)
        assert neg == [imgs[(j + 1 + q) % len(imgs)] for q in range(3)]   # wraps around
    b = itm_val_collate([val[1]])
    assert b["input_ids"].size(0) == 4 and (b["input_ids"] == b["input_ids"][:1]).all()
    with pytest.raises(ValueError, match="mini_batch_size must be an int in \\[1, 7\\]"):
        ItmValDataset(txt_db, img_db, mini_batch_size=8)
    ev = ItmEvalDataset(txt_db, img_db, mini_batch_size=3)
    assert ev.all_img_ids == sorted(imgs, key=img_db.nbb)
    mbs = itm_eval_collate([ev[2]])
    assert [m["img_feat"].size(0) for m in mbs] == [3, 3, 1]
    feats = torch.cat([m["img_feat"][:, :1] for m in mbs])
    for j, img in enumerate(ev.all_img_ids):
        assert torch.equal(feats[j, 0], torch.tensor(img_db[img][0][0]))
    tl = len(recs[ev.ids[2]]["input_ids"]) + 2
    for m, st in zip(mbs, (0, 3, 6)):
        for r in range(m["img_feat"].size(0)):
            _row_layout_ok(m, r, tl, img_db.nbb(ev.all_img_ids[st + r]))


def test_itm_malformed_records_name_db_and_key(tmp_path, itm):
    _, img_db, recs = itm
    bad = dict(recs)
    bad["t1_0"] = {"input_ids": [], "img_fname": "img1.npz"}
    write_txt_db(str(tmp_path / "bad.db"), bad, META)
    _put_raw(str(tmp_path / "bad.db"), "t2_0", b"garbage")    # before any read opens the db
    db = TxtTokLmdb(str(tmp_path / "bad.db"), -1)
    ds = ItmRankDataset(db, img_db, neg_sample_size=1)
    i = ds.ids.index("t1_0")
    with pytest.raises(DbError, match=r"bad\.db.*'t1_0' is empty"):
        ds[i]
    ev = ItmEvalDataset(db, img_db, mini_batch_size=7)
    with pytest.raises(DbError, match=r"bad\.db: corrupt record 't2_0'"):
        ev[ev.ids.index("t2_0")]
    missing = dict(recs)
    missing["t9_0"] = {"input_ids": [5, 6], "img_fname": "img9.npz"}     # no such image
    write_txt_db(str(tmp_path / "miss.db"), missing, META)
    with pytest.raises(DbError, match="img9.npz"):
        ItmRankDataset(TxtTokLmdb(str(tmp_path / "miss.db"), -1), img_db)


# ============================================================================= RE
RE_IMAGES = [{"id": 11, "file_name": "a.jpg", "ann_ids": [101, 102], "height": 100, "width": 200},
             {"id": 12, "file_name": "b.jpg", "ann_ids": [201, 202, 203], "height": 50,
              "width": 80},
             {"id": 13, "file_name": "c.jpg", "ann_ids": [301, 302, 303, 304], "height": 60,
              "width": 60}]


def _re_db(root, sents=None, images=RE_IMAGES, gt_nbb=None):
    refs, anns, rec = [], [], {}
    sid = 0
    rng = np.random.default_rng(2)
    for img in images:
        for a in img["ann_ids"]:
            box = [float(v) for v in rng.integers(0, 40, 4) + 1]
            anns.append({"id": a, "bbox": box, "image_id": img["id"], "category_id": 1})
            ids = []
            for _ in range(1 + a % 2):
                ids.append(sid)
                rec[str(sid)] = {"sent_id": sid, "sent": "x", "ref_id": a * 10, "ann_id": a,
                                 "image_id": img["id"], "bbox": box,
                                 "input_ids": rng.integers(5, 60, 2 + sid % 5).tolist()}
                sid += 1
            refs.append({"ref_id": a * 10, "sent_ids": ids, "ann_id": a, "image_id": img["id"],
                         "split": "train"})
    if sents is not None:
        rec.update(sents)
    write_re_txt_db(str(root / "re.db"), rec, refs, anns, [{"id": 1, "name": "cat"}],
                    list(images), META)
    # ground-truth boxes: one per annotation, fewer than num_bb=100 (read with conf_th -1)
    gt = _img_dumps({re_gt_img_name(i["id"]): (gt_nbb or {}).get(i["id"], len(i["ann_ids"]))
                     for i in images}, 3, conf=False)
    write_img_db(str(root / "gt"), gt, conf_th=-1, num_bb=100, compress=False)
    det = _img_dumps({re_det_img_name(i["id"]): 5 for i in images}, 4, conf=False)
    write_img_db(str(root / "det"), det, conf_th=-1, num_bb=100, compress=False)
    return (str(root / "re.db"), DetectFeatLmdb(str(root / "gt"), -1, 100, 10, 100, False),
            DetectFeatLmdb(str(root / "det"), -1, 100, 10, 100, False), rec, refs)


def test_re_fixed_nbb_records_with_fewer_boxes_load(tmp_path):
    _, gt, det, _, _ = _re_db(tmp_path)
    f, bb = gt[re_gt_img_name(12)]
    assert f.shape == (3, D) and bb.shape == (3, 6)          # min(rows, num_bb)
    assert gt.get_dump(re_gt_img_name(13), with_soft_labels=False)["features"].shape == (4, D)
    assert det[re_det_img_name(11)][0].shape == (5, D)
    # a dynamic db still insists on the box count its nbb file names
    write_img_db(str(tmp_path / "dyn"), _img_dumps({"x.npz": 4}, 0), conf_th=0.2, max_bb=6,
                 min_bb=1)
    dyn = DetectFeatLmdb(str(tmp_path / "dyn"), 0.2, 6, 1)
    dyn.name2nbb["x.npz"] = 5
    with pytest.raises(DbError, match="has 3 rows but 5 boxes are required"):
        dyn.get_dump("x.npz")


def test_re_text_db_sentences_and_filter(tmp_path):
    path, _, _, rec, refs = _re_db(tmp_path)
    db = ReTxtTokLmdb(path, -1)
    want = [str(s) for r in refs for s in r["sent_ids"]]
    assert db.sent_ids == want
    assert db.Cats == {1: "cat"} and set(db.Images) == {11, 12, 13}
    short = ReTxtTokLmdb(path, 4)     # the original keeps len < max_txt_len (strict)
    assert short.sent_ids == [s for s in want if len(rec[s]["input_ids"]) < 4]
    assert db["0"]["ann_id"] == rec["0"]["ann_id"]


def test_re_train_items_batches_and_model(tmp_path):
    path, gt, _, rec, _ = _re_db(tmp_path)
    ds = ReDataset(ReTxtTokLmdb(path, -1), gt)
    items = [ds[i] for i in range(len(ds))]
    for s, it in zip(ds.ids, items):
        img = next(i for i in RE_IMAGES if i["id"] == rec[s]["image_id"])
        assert int(it["target"]) == img["ann_ids"].index(rec[s]["ann_id"])
        assert it["img_feat"].size(0) == len(img["ann_ids"])
        assert it["input_ids"].tolist() == [CLS] + rec[s]["input_ids"] + [SEP]
        assert it["obj_masks"].dtype == torch.uint8 and it["obj_masks"].sum() == 0
    batch = re_collate(items[:5])
    nbbs = [it["img_feat"].size(0) for it in items[:5]]
    assert batch["num_bbs"] == nbbs and batch["txt_lens"] == [len(it["input_ids"]) for it in items[:5]]
    assert batch["targets"].shape == (5, 1)
    assert batch["obj_masks"].tolist() == [[0] * n + [1] * (max(nbbs) - n) for n in nbbs]
    for r in range(5):
        _row_layout_ok(batch, r, batch["txt_lens"][r], nbbs[r])
    torch.manual_seed(0)
    m = UniterForReferringExpressionComprehension(tiny_cfg(), D).eval()
    batch["input_ids"] = batch["input_ids"] % 128
    with torch.no_grad():
        scores = m(batch, compute_loss=False)
        loss = m(batch)
    assert scores.shape == (5, max(nbbs)) and loss.shape == (5,)
    assert (scores[batch["obj_masks"].bool()] == -1e4).all()
    # shuffle: a seeded reorder of the refs, the same for the same seed and epoch
    a, b = ReDataset(ReTxtTokLmdb(path, -1), gt, seed=1), ReDataset(ReTxtTokLmdb(path, -1), gt, seed=1)
    a.shuffle()
    b.shuffle()
    assert a.ids == b.ids and sorted(a.ids) == sorted(ds.ids)


def test_re_eval_items_and_accuracy(tmp_path):
    path, gt, det, rec, _ = _re_db(tmp_path)
    db = ReTxtTokLmdb(path, -1)
    for use_gt, img_db in ((True, gt), (False, det)):
        ds = ReEvalDataset(db, img_db, use_gt_feat=use_gt)
        items = [ds[i] for i in range(4)]
        it = items[2]
        s = ds.ids[2]
        img = next(i for i in RE_IMAGES if i["id"] == rec[s]["image_id"])
        name = (re_gt_img_name if use_gt else re_det_img_name)(img["id"])
        _, bb = img_db[name]
        want = np.stack([bb[:, 0] * img["width"], bb[:, 1] * img["height"],
                         bb[:, 4] * img["width"], bb[:, 5] * img["height"]], axis=1)
        np.testing.assert_allclose(it["obj_boxes"], want, rtol=1e-6)
        assert it["tgt_box"].tolist() == rec[s]["bbox"] and it["sent_id"] == s
        batch = re_eval_collate(items)
        assert batch["sent_ids"] == ds.ids[:4] and "targets" not in batch
        assert len(batch["obj_boxes"]) == 4 and batch["obj_masks"].shape[1] == max(batch["num_bbs"])
    # accuracy: the argmax box against the target, IoU > 0.5 as the original
    ds = ReEvalDataset(db, gt)
    batch = re_eval_collate([ds[i] for i in range(len(ds))])
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(len(ds), max(batch["num_bbs"]), generator=g)
    scores = scores.masked_fill(batch["obj_masks"].bool(), -1e4)
    n_ok, preds = re_eval_batch(scores, batch)
    want_ok = 0
    for r, p in enumerate(preds):
        ix = int(scores[r].argmax())
        assert p == {"sent_id": int(ds.ids[r]), "pred_box": batch["obj_boxes"][r][ix].tolist(),
                     "tgt_box": batch["tgt_box"][r].tolist()}
        want_ok += orc.compute_iou(p["pred_box"], p["tgt_box"]) > 0.5
    assert n_ok == want_ok


def test_compute_iou_matches_the_original():
    rng = np.random.default_rng(0)
    for _ in range(300):
        b1 = rng.integers(0, 30, 4).astype(float) + [0, 0, 1, 1]
        b2 = rng.integers(0, 30, 4).astype(float) + [0, 0, 1, 1]
        assert compute_iou(b1, b2) == orc.compute_iou(b1, b2)
    assert compute_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert compute_iou([0, 0, 10, 10], [9, 9, 10, 10]) == 0.0     # a 1-pixel overlap: x1 == x2
    assert math.isclose(compute_iou([0, 0, 10, 10], [5, 0, 10, 10]), 50 / 150)


def test_re_malformed_records_name_db_and_key(tmp_path):
    bad = {"0": {"sent_id": 0, "ref_id": 1010, "ann_id": 101, "image_id": 11,
                 "input_ids": [5, 6]}}                                      # no bbox
    path, gt, _, _, _ = _re_db(tmp_path / "a", sents=bad)
    ds = ReDataset(ReTxtTokLmdb(path, -1), gt)
    with pytest.raises(DbError, match=r"re\.db: record '0' lacks \['bbox'\]"):
        ds[ds.ids.index("0")]
    # gt image db with the wrong number of boxes for an image's annotations
    path, gt, _, _, _ = _re_db(tmp_path / "b", gt_nbb={12: 2})
    ds = ReDataset(ReTxtTokLmdb(path, -1), gt)
    i = next(k for k, s in enumerate(ds.ids) if ds.txt_db.sent2image[s] == 12)
    with pytest.raises(DbError, match=r"image 12 has 3 annotations but image db .* has 2 boxes"):
        ds[i]
    bad = {"1": {"sent_id": 1, "ref_id": 1020, "ann_id": 999, "image_id": 11, "bbox": [1, 1, 2, 2],
                 "input_ids": [5, 6]}}
    path, gt, _, _, _ = _re_db(tmp_path / "c", sents=bad)
    ds = ReDataset(ReTxtTokLmdb(path, -1), gt)
    with pytest.raises(DbError, match="ann_id 999 is not among image 11"):
        ds[ds.ids.index("1")]


# ============================================================================= VCR
def _vcr_rec(rng, k, qa, qar, big=True):
    tok = (lambda n: rng.integers(5, 60, n).tolist())
    q = tok(3 + k % 3)
    if big:    # person tags: ids past the BERT vocabulary (here 128)
        q[0] = 128 + k % 81
    return {"input_ids": q, "input_ids_as": [tok(1 + (k + a) % 4) for a in range(4)],
            "input_ids_rs": [tok(2 + (k * a) % 3) for a in range(4)], "qa_target": qa,
            "qar_target": qar, "img_fname": [f"gt_{k}.npz", f"det_{k}.npz"]}


@pytest.fixture(scope="module")
def vcr(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcr")
    rng = np.random.default_rng(5)
    recs = {f"val-{k}": _vcr_rec(rng, k, k % 4, (k + 1) % 4) for k in range(5)}
    write_vcr_txt_db(str(root / "vcr.db"), recs, META)
    test = {f"test-{k}": _vcr_rec(rng, k, -1, -1) for k in (3, 10, 2)}
    write_vcr_txt_db(str(root / "test.db"), test, META)
    gt = _img_dumps({f"gt_{k}.npz": 2 + k % 2 for k in range(11)}, 6, conf=False)
    write_img_db(str(root / "gt"), gt, conf_th=-1, num_bb=100)
    det = _img_dumps({f"det_{k}.npz": 4 for k in range(11)}, 7)
    write_img_db(str(root / "det"), det, conf_th=0.2, max_bb=6, min_bb=1)
    return (root, recs, test, DetectFeatLmdb(str(root / "gt"), -1, 100, 10, 100),
            DetectFeatLmdb(str(root / "det"), 0.2, 6, 1))


def _expected_train_rows(rec, task):
    """The original VcrDataset._get_input_ids / __getitem__ layout, restated."""
    q, tq = list(rec["input_ids"]), [0] * len(rec["input_ids"])
    if task == "qar":
        a = [SEP] + rec["input_ids_as"][rec["qa_target"]]
        q, tq = q + a, tq + [2] * len(a)
        choices, t = rec["input_ids_rs"], 3
    else:
        choices, t = rec["input_ids_as"], 2
    return [([CLS] + q + [SEP] + c + [SEP], [0] + tq + [t] * (len(c) + 2)) for c in choices]


def test_vcr_train_items_and_batches(vcr):
    root, recs, _, gt, det = vcr
    for task in ("qa", "qar"):
        db = VcrTxtTokLmdb(str(root / "vcr.db"), -1, task=task)
        ds = VcrDataset(db, img_db_gt=gt, img_db=det)
        item = ds[1]
        rec = recs[ds.ids[1]]
        want = _expected_train_rows(rec, task)
        assert [r["input_ids"].tolist() for r in item] == [w[0] for w in want]
        assert [r["txt_type_ids"].tolist() for r in item] == [w[1] for w in want]
        label = rec[f"{task}_target"]
        assert [int(r["target"]) for r in item] == [int(k == label) for k in range(4)]
        fg, bg = gt[rec["img_fname"][0]]
        fd, bd = det[rec["img_fname"][1]]
        assert torch.equal(item[0]["img_feat"], torch.tensor(np.concatenate([fg, fd])))
        assert item[0]["img_pos_feat"].shape == (len(fg) + len(fd), 7)
        # lens as the original: a conf_th=-1 db counts num_bb boxes per image (name2nbb)
        assert ds.lens[1] == db.id2len[ds.ids[1]] + 100 + len(fd)
        batch = vcr_collate([ds[0], ds[1]])
        assert batch["input_ids"].size(0) == 8 and batch["targets"].shape == (8, 1)
        rows = ds[0] + ds[1]
        for r, row in enumerate(rows):
            tl = len(row["input_ids"])
            assert batch["txt_type_ids"][r, :tl].tolist() == row["txt_type_ids"].tolist()
            _row_layout_ok(batch, r, tl, row["img_feat"].size(0))
    # only one image db
    db = VcrTxtTokLmdb(str(root / "vcr.db"), -1, task="qa")
    only_gt = VcrDataset(db, img_db_gt=gt)
    assert only_gt[0][0]["img_feat"].size(0) == gt.get_dump(recs[only_gt.ids[0]]["img_fname"][0], False)[
        "features"].shape[0]
    with pytest.raises(ValueError, match="cannot both be None"):
        VcrDataset(db)
    with pytest.raises(ValueError, match="one task at a time"):
        VcrDataset(VcrTxtTokLmdb(str(root / "vcr.db"), -1), img_db=det)
    with pytest.raises(ValueError, match="'qa', 'qar' or 'qa,qar'"):
        VcrTxtTokLmdb(str(root / "vcr.db"), -1, task="q")


def _expected_eval_rows(rec, split):
    """The original VcrEvalDataset._get_input_ids layout, restated."""
    q, tq = rec["input_ids"], [0] * len(rec["input_ids"])
    rows = [([CLS] + q + [SEP] + a + [SEP], [0] + tq + [2] * (len(a) + 2))
            for a in rec["input_ids_as"]]
    for k, a in enumerate(rec["input_ids_as"]):
        if split == "test" or k == rec["qa_target"]:
            for r in rec["input_ids_rs"]:
                rows.append(([CLS] + q + [SEP] + a + [SEP] + r + [SEP],
                             [0] + tq + [2] * (len(a) + 1) + [3] * (len(r) + 2)))
    return rows


def test_vcr_eval_items_batches_model_and_metrics(vcr):
    root, recs, test, gt, det = vcr
    db = VcrTxtTokLmdb(str(root / "vcr.db"), -1)
    assert db.id2len == {k: len(v["input_ids"]) + max(map(len, v["input_ids_as"]))
                         + max(map(len, v["input_ids_rs"])) for k, v in recs.items()}
    val = VcrEvalDataset("val", db, img_db_gt=gt, img_db=det)
    for split, d in (("val", val), ("test", VcrEvalDataset("test", db, img_db_gt=gt, img_db=det))):
        outs, qid, qa_t, qar_t = d[2]
        rec = recs[qid]
        want = _expected_eval_rows(rec, split)
        assert len(outs) == (8 if split == "val" else 20)
        assert [o["input_ids"].tolist() for o in outs] == [w[0] for w in want]
        assert [o["txt_type_ids"].tolist() for o in outs] == [w[1] for w in want]
        assert int(qa_t) == rec["qa_target"] and int(qar_t) == rec["qar_target"]
    batch = vcr_eval_collate([val[i] for i in range(len(val))])
    assert batch["qids"] == val.ids and batch["qa_targets"].shape == (5, 1)
    assert batch["input_ids"].size(0) == 40
    # the VCR model scores the batch (person tags need init_word_embedding) ...
    torch.manual_seed(0)
    m = UniterForVisualCommonsenseReasoning(tiny_cfg(), D)
    m.init_type_embedding()
    m.init_word_embedding(81)
    with torch.no_grad(), ops.use_backend("reference"):
        scores = m.eval()(batch, compute_loss=False)
    assert scores.shape == (40, 1)
    # ... and the evaluator gives the original's numbers
    ev = VcrEvaluator()
    ev.update(scores, batch)
    got = VcrEvaluator.metrics(ev.totals())
    n_qa, n_qar, n_all, l_qa, l_qar = orc.vcr_accuracies(scores, batch["qa_targets"],
                                                         batch["qar_targets"])
    assert got["acc_qa"] == n_qa / 5 and got["acc_qar"] == n_qar / 5 and got["acc"] == n_all / 5
    assert math.isclose(got["vcr_qa_loss"], l_qa / 5, rel_tol=1e-5)
    assert math.isclose(got["vcr_qar_loss"], l_qar / 5, rel_tol=1e-5)
    assert set(ev.results) == set(val.ids) and len(ev.results[val.ids[0]]) == 8
    with pytest.raises(DbError, match="split='val' needs it"):
        VcrEvalDataset("val", VcrTxtTokLmdb(str(root / "test.db"), -1), img_db=det)[0]


def test_vcr_qar_selection_accuracies_and_submission(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 50
    scores = torch.randn(n, 20, generator=g)
    qa_t = torch.randint(0, 4, (n, 1), generator=g)
    qar_t = torch.randint(0, 4, (n, 1), generator=g)
    sel = qar_scores(scores, qa_t)
    for i in range(n):
        a = int(qa_t[i])
        assert sel[i].tolist() == scores[i, 4 + 4 * a:8 + 4 * a].tolist()
    ev = VcrEvaluator()
    ev.update(scores.view(-1, 1), {"qids": [f"test-{i}" for i in range(n)], "qa_targets": qa_t,
                                   "qar_targets": qar_t})
    got = VcrEvaluator.metrics(ev.totals())
    n_qa, n_qar, n_all, _, _ = orc.vcr_accuracies(scores, qa_t, qar_t)
    assert (got["acc_qa"], got["acc_qar"], got["acc"]) == (n_qa / n, n_qar / n, n_all / n)
    # test split (targets -1): results only
    ev2 = VcrEvaluator()
    ids = ["test-10", "test-2", "test-3"]
    ev2.update(scores[:3].reshape(-1, 1), {"qids": ids, "qa_targets": torch.full((3, 1), -1),
                                           "qar_targets": torch.full((3, 1), -1)})
    assert ev2.totals()[:5] == [0.0] * 5 and ev2.totals()[5] == 3
    path = tmp_path / "sub.csv"
    write_vcr_submission(ev2.results, str(path))
    rows = list(csv.reader(open(path)))
    assert rows[0] == (["annot_id"] + [f"answer_{i}" for i in range(4)]
                       + [f"rationale_conditioned_on_a{a}_{i}" for a in range(4) for i in range(4)])
    assert [r[0] for r in rows[1:]] == ["test-2", "test-3", "test-10"]     # numeric id order
    assert [float(v) for v in rows[1][1:]] == ev2.results["test-2"]
    with pytest.raises(ValueError, match="needs 20"):
        vcr_submission_rows({"test-1": [0.0] * 8})


def test_vcr_malformed_records_name_db_and_key(tmp_path, vcr):
    _, recs, _, _, det = vcr
    path = str(tmp_path / "bad.db")
    bad = dict(recs)
    bad["val-1"] = dict(recs["val-1"], input_ids_as=recs["val-1"]["input_ids_as"][:3])
    bad["val-2"] = dict(recs["val-2"], qa_target=7)
    write_vcr_txt_db(path, bad, META, id2len_qa={k: 5 for k in bad})
    _put_raw(path, "val-3", lz4.frame.compress(msgpack.dumps(dict(recs["val-3"],
                                                                  img_fname="gt_3.npz"))))
    # a record whose img_fname disagrees with txt2img.json
    _put_raw(path, "val-4", lz4.frame.compress(msgpack.dumps(dict(recs["val-4"],
                                                                  img_fname=["a", "b"]))))
    ds = VcrDataset(VcrTxtTokLmdb(path, -1, task="qa"), img_db=det)
    with pytest.raises(DbError, match=r"bad\.db: record 'val-1': input_ids_as must be 4 lists"):
        ds[ds.ids.index("val-1")]
    with pytest.raises(DbError, match=r"'val-2': qa_target must be an int in \[-1, 4\)"):
        ds[ds.ids.index("val-2")]
    with pytest.raises(DbError, match=r"'val-3': img_fname must be \[gt image, detected image\]"):
        ds[ds.ids.index("val-3")]
    with pytest.raises(DbError, match=r"'val-4' names images \['a', 'b'\] but txt2img"):
        ds[ds.ids.index("val-4")]
    assert len(ds[0]) == 4
    bad_map = dict(bad, **{"val-0": dict(recs["val-0"], img_fname=["a", "b", "c"])})
    write_vcr_txt_db(str(tmp_path / "bad2.db"), bad_map, META)
    with pytest.raises(DbError, match=r"bad2\.db: txt2img.json must map 'val-0' to \[gt image"):
        VcrDataset(VcrTxtTokLmdb(str(tmp_path / "bad2.db"), -1, task="qa"), img_db=det)
