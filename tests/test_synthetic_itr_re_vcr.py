"""Synthetic retrieval / RE / VCR dbs (uniter_fast.data.synthetic_tasks.{itm,re,vcr}):
deterministic, read by the real datasets, and learnable by construction (each checked from
the stored records and boxes, independently of the generator's code paths)."""
import hashlib
import itertools
import json
import os
import random
from math import comb

import numpy as np
import pytest

from uniter_fast.data.db import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.synthetic import CELL_NAMES, CLASS_NAMES, SyntheticSpec
from uniter_fast.data.synthetic_tasks import (
    TaskSpec,
    ensure_task_dbs,
    generate_task_dbs,
    itm,
    make_spec,
    vcr,
)
from uniter_fast.data.synthetic_tasks import re as synthetic_re
from uniter_fast.data.synthetic_tasks.itm import itm_chance

WORLD = SyntheticSpec(seed=3, num_classes=8, num_train_images=10, num_val_images=4,
                      feat_dim=64)
GEN = {"itm": itm, "re": synthetic_re, "vcr": vcr}


def _spec(task, **kw):
    kw = {"num_train": 12, "num_val": 20, "num_test": 6, "per_item": 2, **kw}
    return make_spec(GEN[task], kw)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {t: ensure_task_dbs(g, _spec(t), WORLD, cache_dir=str(root)) for t, g in GEN.items()}


def _cell_of(box, grid):
    """Cell of a box from its centre (norm_bb x1, y1, x2, y2)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(cy * grid), grid - 1) * grid + min(int(cx * grid), grid - 1)


def _records(db):
    return {k: db[k] for k in db.id2len}


def _words(ids, vocab):
    return [vocab[i] for i in ids]


def test_deterministic(tmp_path):
    for task, gen in GEN.items():
        a = generate_task_dbs(gen, str(tmp_path / f"{task}_a"), _spec(task, num_train=4), WORLD)
        b = generate_task_dbs(gen, str(tmp_path / f"{task}_b"), _spec(task, num_train=4), WORLD)
        for split in ("train", "val", "test"):
            ra, rb = _records(TxtTokLmdb(a[split], -1)), _records(TxtTokLmdb(b[split], -1))
            assert ra == rb and ra
        c = generate_task_dbs(gen, str(tmp_path / f"{task}_c"),
                              _spec(task, num_train=4, seed=9), WORLD)
        assert _records(TxtTokLmdb(c["val"], -1)) != _records(TxtTokLmdb(a["val"], -1))


def test_cache_is_reused_and_atomic(tmp_path):
    p1 = ensure_task_dbs(itm, _spec("itm", num_train=4), WORLD, cache_dir=str(tmp_path))
    mtime = os.path.getmtime(os.path.join(p1["root"], "spec.json"))
    p2 = ensure_task_dbs(itm, _spec("itm", num_train=4), WORLD, cache_dir=str(tmp_path))
    assert p1 == p2 and os.path.getmtime(os.path.join(p2["root"], "spec.json")) == mtime
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".")]   # no temp dir left


def test_parts_are_the_paths(dbs):
    want = {"itm": ("train", "val", "test", "img"),
            "re": ("train", "val", "test", "img_gt", "img_det"),
            "vcr": ("train", "val", "test", "img_gt", "img")}
    for task, gen in GEN.items():
        assert gen.NAME == task and gen.PARTS == want[task]
        p = dbs[task]
        assert set(p) == {"root", *gen.PARTS}
        assert os.path.basename(p["root"]).startswith(f"synthetic-{task}-")
        assert all(os.path.isdir(p[part]) for part in gen.PARTS)
    assert os.path.basename(dbs["vcr"]["img"]) == "vcr_det"
    assert os.path.basename(dbs["re"]["img_gt"]) == "re_coco_gt"


def test_itm_eval_images_have_distinct_class_sets(dbs):
    p = dbs["itm"]
    vocab = json.load(open(os.path.join(p["train"], "meta.json")))["vocab"]
    img = DetectFeatLmdb(p["img"], WORLD.conf_th, WORLD.max_bb, WORLD.min_bb, 36, True)
    for split in ("val", "test"):
        db = TxtTokLmdb(p[split], -1)
        recs = _records(db)
        by_img = {}
        for k, r in recs.items():
            named = frozenset(w for w in _words(r["input_ids"], vocab) if w in CLASS_NAMES)
            by_img.setdefault(r["img_fname"], set()).add(named)
        # every caption of an image names the same classes; no two images share them
        assert all(len(s) == 1 for s in by_img.values())
        sets = [next(iter(s)) for s in by_img.values()]
        assert len(set(sets)) == len(sets) == {"val": 20, "test": 6}[split]
        # the named classes are the image's objects (the detector's argmax on kept boxes)
        for fname, s in by_img.items():
            d = img.get_dump(fname, with_soft_labels=True)
            top = {CLASS_NAMES[c - 1] for c in np.argmax(d["soft_labels"], 1) if c > 0}
            assert next(iter(s)) <= top
        assert sorted(len(v) for v in db.img2txts.values()) == [2] * len(by_img)


def test_itm_chance_against_simulation():
    rng = random.Random(0)
    n_img, per = 7, 2
    n_txt = n_img * per
    for k in (1, 5, 10):
        exact = itm_chance(n_txt, n_img, per, k)
        # text retrieval: P(one of the image's captions is in a random top-k of all texts)
        hits = 0
        for _ in range(20000):
            top = rng.sample(range(n_txt), min(k, n_txt))
            hits += any(t < per for t in top)
        assert abs(hits / 20000 - exact[f"txt_r{k}"]) < 0.015
        assert exact[f"img_r{k}"] == pytest.approx(min(k, n_img) / n_img)
    assert itm_chance(10, 5, 2, 1)["txt_r1"] == pytest.approx(1 - comb(8, 1) / comb(10, 1))


def test_re_expression_picks_one_region(dbs):
    from uniter_fast.data.re import ReDataset, ReEvalDataset, ReTxtTokLmdb
    from uniter_fast.eval.re import compute_iou
    p = dbs["re"]
    grid = WORLD.grid
    gt = DetectFeatLmdb(p["img_gt"], -1, 100, 10, 100, True)
    det = DetectFeatLmdb(p["img_det"], -1, 100, 10, 100, True)
    txt = ReTxtTokLmdb(p["val"], -1)
    vocab = txt.meta["vocab"]
    n_det, n = 0, 0
    ds = ReDataset(txt, gt)
    for i, sid in enumerate(ds.ids):
        item, rec = ds[i], txt[sid]
        words = _words(rec["input_ids"], vocab)
        assert words[0] == "the" and words[1] in CLASS_NAMES and len(words) in (2, 3)
        img = txt.Images[rec["image_id"]]
        anns = [txt.Anns[a] for a in img["ann_ids"]]
        boxes = item["img_pos_feat"].numpy()
        cls_ok = [CLASS_NAMES[a["category_id"] - 1] == words[1] for a in anns]
        cell_ok = [len(words) == 2 or CELL_NAMES[grid][_cell_of(b, grid)] == words[2]
                   for b in boxes]
        match = [j for j in range(len(anns)) if cls_ok[j] and cell_ok[j]]
        assert match == [int(item["target"])]            # exactly the referred region
        n += 1
    assert n == len(txt.sent_ids) == 40
    ev = ReEvalDataset(txt, det, use_gt_feat=False)
    for i in range(len(ev)):
        it = ev[i]
        n_det += len(it["obj_boxes"])
        # the target box is one of the detected boxes (IoU > 0.5 with exactly one)
        ious = [compute_iou(b, it["tgt_box"]) for b in it["obj_boxes"]]
        assert sum(v > 0.5 for v in ious) == 1 and max(ious) > 0.9
    assert n_det / len(ev) == WORLD.regions_per_image


def test_vcr_answers_and_rationales(dbs):
    from uniter_fast.data.vcr import VcrDataset, VcrEvalDataset, VcrTxtTokLmdb
    p = dbs["vcr"]
    gt = DetectFeatLmdb(p["img_gt"], -1, 100, 10, 100, True)
    det = DetectFeatLmdb(p["img"], WORLD.conf_th, WORLD.max_bb, WORLD.min_bb, 36, True)
    txt = VcrTxtTokLmdb(p["val"], -1, "qa,qar")
    vocab = txt.meta["vocab"]
    assert vocab == vcr.vocab(WORLD)
    labels_qa = []
    for qid in txt.id2len:
        r = txt[qid]
        q = _words(r["input_ids"], vocab)
        assert q[:4] == ["what", "is", "at", "the"] and q[-1] == "?"
        cell = CELL_NAMES[WORLD.grid].index(q[4])
        d = gt.get_dump(r["img_fname"][0], with_soft_labels=True)
        img_cls = [CLASS_NAMES[c - 1] for c in np.argmax(d["soft_labels"], 1)]
        cells = [_cell_of(b, WORLD.grid) for b in d["norm_bb"]]
        at = [c for c, ce in zip(img_cls, cells) if ce == cell]
        ans = [_words(a, vocab)[1] for a in r["input_ids_as"]]
        rats = [_words(x, vocab)[-2] for x in r["input_ids_rs"]]
        assert len(set(ans)) == 4 and len(set(rats)) == 4
        assert [a for a in ans if a in at] == [ans[r["qa_target"]]]
        present = set(img_cls) - {ans[r["qa_target"]]}
        assert [x for x in rats if x in present] == [rats[r["qar_target"]]]
        labels_qa.append(r["qa_target"])
    assert len(set(labels_qa)) > 1                   # the right answer's slot varies
    assert len(VcrDataset(VcrTxtTokLmdb(p["train"], 60, "qa"), gt, det)[0]) == 4
    ev = VcrEvalDataset("val", txt, gt, det)
    assert len(ev[0][0]) == 8
    test = VcrTxtTokLmdb(p["test"], -1, "qa,qar")
    assert all(test[k]["qa_target"] == -1 == test[k]["qar_target"] for k in test.id2len)
    assert len(VcrEvalDataset("test", test, gt, det)[0][0]) == 20


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="synthetic_task.task is 'vqa' but this run's data is "
                                         "'itm'"):
        make_spec(itm, {"task": "vqa"})
    with pytest.raises(ValueError, match=r"bad 'synthetic_task' section.*\['annotators', "
                                         r"'max_count'\]"):
        make_spec(synthetic_re, {"max_count": 2, "annotators": 3, "seed": 2})
    with pytest.raises(ValueError, match="'itm' given to the 'vcr' generator"):
        ensure_task_dbs(vcr, _spec("itm"), WORLD, str(tmp_path))
    with pytest.raises(ValueError, match="distinct class sets"):
        ensure_task_dbs(itm, make_spec(itm, {"num_val": 10_000}), WORLD, str(tmp_path))
    with pytest.raises(ValueError, match="absent"):
        vcr.validate(make_spec(vcr, {"max_objects": 6}), WORLD)
    with pytest.raises(ValueError, match="min_objects"):
        synthetic_re.validate(make_spec(synthetic_re, {"min_objects": 1}), WORLD)
    with pytest.raises(ValueError, match="num_test"):
        itm.validate(make_spec(itm, {"num_test": 1}), WORLD)
    assert not os.listdir(tmp_path), "nothing generated"


def test_spec_defaults():
    want = {"seed": 1, "num_train": 600, "num_val": 100, "num_test": 50, "per_item": 2,
            "min_objects": 2, "max_objects": 4}
    for task, gen in GEN.items():
        assert gen.DEFAULTS == want and gen.FIELDS == tuple(want)
        spec = make_spec(gen, {"task": task, "num_test": 7})
        assert spec == TaskSpec(task=task, **dict(want, num_test=7))
        assert spec.max_count is spec.annotators is spec.annotator_accuracy is None
        rec = spec.recorded(gen)          # spec.json's "task" and the cache key's
        assert rec == dict(want, task=task, num_test=7)
        assert list(rec) == ["task", "seed", "num_train", "num_val", "num_test", "per_item",
                             "min_objects", "max_objects"]


#: decoded digests (_db_digest) of the fixture's dbs, as written before the generators
#: became one package: the data the README's fine-tuning figures were measured on come from
#: this code, so a change here needs new figures (and the generator's FORMAT_VERSION bumped)
GOLDEN = {"itm": "8b7dc844a3d60c9f747734e4ebe75a8e1648d5bc",
          "re": "43a57f19a7f37815aef674aecddf3cf77eee337a",
          "vcr": "2835bf370fe2dd8ad9371d79800978ee89447726"}


def _db_digest(task, p):
    """Hash of every record of the text dbs, their json side files and every image record
    (decoded)."""
    h = hashlib.sha1()
    for split in ("train", "val", "test"):
        db = TxtTokLmdb(p[split], -1)
        for k in sorted(db.id2len):
            h.update(json.dumps(db[k], sort_keys=True).encode())
        for f in sorted(os.listdir(p[split])):
            if f.endswith(".json"):
                with open(os.path.join(p[split], f)) as fh:
                    h.update(f.encode() + json.dumps(json.load(fh), sort_keys=True).encode())
    world_rule = (WORLD.conf_th, WORLD.max_bb, WORLD.min_bb, 36, True)
    gt_rule = (-1, 100, 10, 100, True)
    imgs = {"itm": [("img", world_rule)], "re": [("img_gt", gt_rule), ("img_det", gt_rule)],
            "vcr": [("img_gt", gt_rule), ("img", world_rule)]}[task]
    for part, rule in imgs:
        img = DetectFeatLmdb(p[part], *rule)
        for name in sorted(img.names()):
            for k, v in sorted(img.get_dump(name).items()):
                h.update(k.encode() + np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("task", ["itm", "re", "vcr"])
def test_generated_data_unchanged(task, dbs):
    assert _db_digest(task, dbs[task]) == GOLDEN[task]


def test_synthetic_paths_resolve_only_their_task():
    from uniter_fast.tasks import get_task
    from uniter_fast.tasks.base import resolve_synthetic
    re_task = get_task("re")
    assert resolve_synthetic("/data/x.db", re_task, {}) == "/data/x.db"
    with pytest.raises(ValueError, match="synthetic itm db"):
        resolve_synthetic("synthetic-itm:train", re_task, {})
    with pytest.raises(ValueError, match="unknown synthetic db"):
        resolve_synthetic("synthetic-re:img", re_task, {})


def test_example_sampler():
    from uniter_fast.data.sampler import ExampleSampler
    s = ExampleSampler(4, droplast=True, seed=1)
    b0, b1 = s.batches(list(range(10)), 0), s.batches(list(range(10)), 1)
    assert [len(b) for b in b0] == [4, 4] and b0 == s.batches(list(range(10)), 0) and b0 != b1
    flat = list(itertools.chain(*ExampleSampler(3, shuffle=False).batches([0] * 7, 0)))
    assert flat == list(range(7))
    with pytest.raises(ValueError):
        ExampleSampler(0)
