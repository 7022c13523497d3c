"""``python -m uniter_fast.predict`` and its library: image files and text to every task's
answer, the same answers and scores as ``python -m uniter_fast.infer`` on a db of the same
images and texts, the feature cache (detector calls counted), clear errors, and the pictures
checked by their pixels (box outlines, heat-map cells read back through the colormap, the
WRA plan against the reference IPOT).  A tiny detector (tests/detector_layouts.py, images
resized to 64..100 pixels) and the tiny UNITER with random weights keep it fast."""
import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from detector_layouts import TINY, random_weights, write_pkl
from PIL import Image

from uniter_fast import ops, reference
from uniter_fast.data.db import write_txt_db
from uniter_fast.data.re import write_re_txt_db
from uniter_fast.data.vcr import write_vcr_txt_db
from uniter_fast.extract import ExtractOptions, extract
from uniter_fast.infer import main as infer_main
from uniter_fast.predict import Labels, PredictError, Predictor, load_labels
from uniter_fast.predict import draw as draw_lib
from uniter_fast.predict.__main__ import main as predict_main
from uniter_fast.prepro import BertTokenizer
from uniter_fast.tasks import get_task

SIZES = dict(min_size=64, max_size=100)
CLI_SIZES = ["--min_size", "64", "--max_size", "100"]
#: the tiny detector's region feature width (the tiny models' img_dim)
FEAT_DIM = TINY["res2"] * 8
PREFIX = "visual_grounding_det_coco_"          # RE's detected-box keys; every task uses them
BOX_RULE = {"conf_th": 0.2, "max_bb": 12, "min_bb": 4}
#: image id -> (height, width)
IMAGES = {1: (90, 120), 2: (100, 70), 3: (80, 80), 4: (60, 110)}
WORDS = ["what", "is", "on", "the", "table", "a", "dog", "cat", "man", "left", "right",
         "sofa", "two", "red", "of", "are", "there", "because", "it", "##s", "##ing"]
ANSWERS = ["yes", "no", "dog", "cat", "table", "two"]
QUESTIONS = ["what is on the table?", "is there a dog?", "what color is the sofa",
             "are there two cats?", "what is left of the man?"]
CAPTIONS = ["a dog on a sofa", "two cats on the table", "a man on the left",
            "the red sofa", "a cat"]


def _vocab():
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(33, 127)]
    return list(dict.fromkeys(toks + WORDS))


def _image(seed, h, w):
    """Smooth colours plus noise, every channel in [20, 235]: no pixel is a drawing colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([60 + 120 * x / w, 60 + 120 * y / h, 90 + 60 * ((x + y) % 17) / 17], -1)
    return np.clip(base + rng.integers(-25, 25, (h, w, 3)), 20, 235).astype(np.uint8)


def _cfg(**extra):
    return {"model_config": "uniter-tiny", "img_dim": FEAT_DIM, **BOX_RULE, **extra}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Detector weights, images, vocabulary, an image db of the images (extracted one image
    per forward, as the predictor runs them here) and a random model of every task saved as
    a plain .pt with its training config."""
    base = tmp_path_factory.mktemp("predict")
    d = {"base": str(base)}
    d["detector"] = str(base / "vg_tiny.pkl")
    write_pkl(d["detector"], random_weights(TINY, seed=1))
    img_dir = base / "images"
    img_dir.mkdir()
    d["images"] = {}
    for i, (h, w) in IMAGES.items():
        path = str(img_dir / f"{i:012d}.png")
        Image.fromarray(_image(i, h, w)).save(path)
        d["images"][i] = path
    d["vocab"] = str(base / "vocab.txt")
    with open(d["vocab"], "w") as f:
        f.write("\n".join(_vocab()) + "\n")
    d["tok"] = BertTokenizer.from_vocab(d["vocab"])
    a2l = str(base / "ans2label.json")
    with open(a2l, "w") as f:
        json.dump({a: i for i, a in enumerate(ANSWERS)}, f)
    d["img_db"] = str(base / "img_db")
    extract(ExtractOptions(detector=d["detector"], images=str(img_dir), out=d["img_db"],
                           prefix=PREFIX, batch_size=1, workers=0, progress=False,
                           **BOX_RULE, **SIZES), log=lambda s: None)
    d["pt"], d["cfg"] = {}, {}
    extras = {"vqa": {"ans2label": a2l}, "nlvr2": {"model": "paired"},
              "nlvr2-triplet": {"model": "triplet"}}
    for name in ("vqa", "ve", "nlvr2", "nlvr2-triplet", "itm", "re", "vcr"):
        task = get_task(name.split("-")[0])
        cfg = _cfg(**extras.get(name, {}))
        cfg_path = str(base / f"{name}_config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        c = dict(cfg)
        task.check_config(c)
        torch.manual_seed(len(name))
        model = task.blank_model(c)
        pt = str(base / f"{name}.pt")
        torch.save(model.state_dict(), pt)
        d["pt"][name], d["cfg"][name] = pt, cfg_path
    return d


def _key(i):
    return f"{PREFIX}{i:012d}.npz"


def _predictor(world, name, **kw):
    kw = dict(dict(vocab=world["vocab"], config=world["cfg"][name], detector_batch_size=1,
                   **SIZES), **kw)
    return Predictor(name.split("-")[0], world["pt"][name], world["detector"], **kw)


def _cli(world, name, *args):
    return ["--task", name.split("-")[0], "--checkpoint", world["pt"][name], "--config",
            world["cfg"][name], "--detector", world["detector"], "--vocab", world["vocab"],
            "--detector_batch_size", "1", "--no_progress", *CLI_SIZES, *args]


def _infer(world, name, txt_db, *args):
    argv = ["--task", name.split("-")[0], "--checkpoint", world["pt"][name], "--config",
            world["cfg"][name], "--txt_db", txt_db, "--img_db", world["img_db"],
            "--no_progress", "--device", "cpu", *args]
    assert infer_main(argv) == 0


# ----------------------------------------------------------------------------- predict == infer


def _ids(world, text):
    return world["tok"].tokenize(text)


def test_vqa_and_ve_equal_infer(world, tmp_path):
    for name, field in (("vqa", "question"), ("ve", "hypothesis")):
        recs, reqs = {}, []
        for k, q in enumerate(QUESTIONS):
            img = 1 + k % len(IMAGES)
            recs[str(100 + k)] = {"input_ids": _ids(world, q), "img_fname": _key(img)}
            reqs.append({"id": str(100 + k), "image": world["images"][img], field: q})
        db = str(tmp_path / f"{name}_txt")
        write_txt_db(db, recs, world["tok"].meta())
        out = str(tmp_path / f"{name}.json")
        _infer(world, name, db, "--output", out, *(["--save_logits"] if name == "vqa" else []))
        with open(out) as f:
            got = json.load(f)
        want = ({str(r["question_id"]): r["answer"] for r in got} if name == "vqa" else got)
        res = _predictor(world, name).answer(reqs)
        assert {r.request["id"]: r.answer["answer"] for r in res} == want
        if name == "vqa":
            logits = np.load(str(tmp_path / "vqa_logits.npz"))
            for r in res:
                row = logits[r.request["id"]].astype(np.float32)
                for t in r.answer["top"]:
                    assert t["logit"] == pytest.approx(float(row[ANSWERS.index(t["answer"])]),
                                                       abs=2e-3)
                assert r.answer["score"] == pytest.approx(1 / (1 + np.exp(-row.max())), abs=1e-3)
                assert len(r.answer["top"]) == 5


@pytest.mark.parametrize("name", ["nlvr2", "nlvr2-triplet"])
def test_nlvr2_equals_infer(world, tmp_path, name):
    recs, reqs = {}, []
    for k, s in enumerate(CAPTIONS[:4]):
        pair = (1 + k % 4, 1 + (k + 1) % 4)
        ident = f"dev-{k}-0-{k}"
        recs[ident] = {"input_ids": _ids(world, s), "img_fname": [_key(i) for i in pair],
                       "target": None}
        reqs.append({"id": ident, "images": [world["images"][i] for i in pair],
                     "statement": s})
    db = str(tmp_path / "nlvr2_txt")
    write_txt_db(db, recs, world["tok"].meta())
    out = str(tmp_path / "nlvr2.csv")
    _infer(world, name, db, "--output", out)
    with open(out) as f:
        want = dict(line.strip().split(",") for line in f if line.strip())
    res = _predictor(world, name).answer(reqs)
    assert {r.request["id"]: r.answer["answer"] for r in res} == want
    for r in res:
        assert sum(t["score"] for t in r.answer["top"]) == pytest.approx(1.0, abs=1e-5)


def test_itm_equals_infer(world, tmp_path):
    recs = {}
    for k, c in enumerate(CAPTIONS):
        recs[str(k)] = {"input_ids": _ids(world, c), "img_fname": _key(1 + k % len(IMAGES))}
    db = str(tmp_path / "itm_txt")
    write_txt_db(db, recs, world["tok"].meta())
    out_dir = str(tmp_path / "itm_out")
    _infer(world, "itm", db, "--output_dir", out_dir)
    with open(os.path.join(out_dir, "results.bin"), "rb") as f:
        scores, txt_ids, img_ids = pickle.load(f)
    pred = _predictor(world, "itm")
    reqs = [{"image": world["images"][i], "text": CAPTIONS} for i in IMAGES]
    res = pred.answer(reqs)
    for i, r in zip(IMAGES, res):
        col = img_ids.index(_key(i))
        want = [float(scores[txt_ids.index(str(k)), col]) for k in range(len(CAPTIONS))]
        assert r.answer["scores"] == pytest.approx(want, abs=1e-4)
        assert [t["index"] for t in r.answer["top"]] == sorted(range(len(want)),
                                                               key=lambda k: -want[k])
        assert r.answer["answer"] == CAPTIONS[r.answer["top"][0]["index"]]


def test_re_equals_infer(world, tmp_path):
    sents, refs, anns, images = {}, [], [], []
    for i, (h, w) in IMAGES.items():
        images.append({"id": i, "file_name": os.path.basename(world["images"][i]),
                       "ann_ids": [10 * i], "height": h, "width": w})
        anns.append({"id": 10 * i, "bbox": [1, 2, 30, 20], "category_id": 1, "image_id": i,
                     "area": 600, "iscrowd": 0})
    reqs = []
    for k, c in enumerate(CAPTIONS):
        i = 1 + k % len(IMAGES)
        sents[str(k)] = {"sent_id": k, "sent": c, "input_ids": _ids(world, c), "image_id": i,
                         "ann_id": 10 * i, "bbox": [1, 2, 30, 20]}
        refs.append({"ref_id": k, "sent_ids": [k], "ann_id": 10 * i, "image_id": i,
                     "split": "val"})
        reqs.append({"id": k, "image": world["images"][i], "text": c})
    db = str(tmp_path / "refcoco_val")
    write_re_txt_db(db, sents, refs, anns, [{"id": 1, "name": "thing"}], images,
                    world["tok"].meta())
    out_dir = str(tmp_path / "re_out")
    _infer(world, "re", db, "--output_dir", out_dir)
    [f] = os.listdir(out_dir)
    with open(os.path.join(out_dir, f)) as fh:
        want = {p["sent_id"]: p["pred_box"] for p in json.load(fh)}
    res = _predictor(world, "re").answer(reqs)
    for r in res:
        assert r.answer["answer"] == pytest.approx(want[r.request["id"]], abs=1e-3)
        top = r.answer["top"]
        assert top[0]["region"] == r.answer["region"] and len(top) == 5
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)


def test_vcr_equals_infer(world, tmp_path):
    qs = ["what is the man on?", "is the dog left of the cat?"]
    answers = [["a sofa", "the table", "a dog", "two cats"],
               ["yes", "no", "it is right", "there is no dog"]]
    rats = ["because it is red", "the man is on it", "a cat is there", "it is a dog"]
    recs, reqs = {}, []
    for k, (q, a) in enumerate(zip(qs, answers)):
        recs[f"test-{k}"] = {"input_ids": _ids(world, q),
                             "input_ids_as": [_ids(world, x) for x in a],
                             "input_ids_rs": [_ids(world, x) for x in rats],
                             "qa_target": -1, "qar_target": -1,
                             "img_fname": ["unused_gt.npz", _key(k + 1)]}
        reqs.append({"id": f"test-{k}", "image": world["images"][k + 1], "question": q,
                     "answer": a, "rationale": rats})
    db = str(tmp_path / "vcr_test")
    write_vcr_txt_db(db, recs, world["tok"].meta())
    out_dir = str(tmp_path / "vcr_out")
    _infer(world, "vcr", db, "--output_dir", out_dir)
    [js] = [f for f in os.listdir(out_dir) if f.endswith(".json")]
    with open(os.path.join(out_dir, js)) as f:
        want = json.load(f)
    pred = _predictor(world, "vcr")
    res = pred.answer(reqs)
    for r in res:
        s = want[r.request["id"]]
        assert len(s) == 20 and r.answer["scores"] == pytest.approx(s, abs=1e-4)
        best = int(np.argmax(s[:4]))
        assert r.answer["answer_index"] == best
        assert r.answer["rationale_index"] == int(np.argmax(s[4 + 4 * best:8 + 4 * best]))
    # without rationales: Q->A only, the same Q->A scores
    [r0] = pred.answer([dict(reqs[0], rationale=None)])
    assert r0.answer["scores"] == pytest.approx(want["test-0"][:4], abs=1e-4)
    assert "rationale" not in r0.answer


# ----------------------------------------------------------------------------- cache


def _same_answer(a, b):
    """The same answer (scores up to the float error of another batch's padding)."""
    assert a["answer"] == b["answer"]
    assert [t["answer"] for t in a["top"]] == [t["answer"] for t in b["top"]]
    assert [t["logit"] for t in a["top"]] == pytest.approx([t["logit"] for t in b["top"]],
                                                           abs=1e-5)


def test_feature_cache_runs_the_detector_once_per_image(world, tmp_path):
    cache = str(tmp_path / "cache")
    pred = _predictor(world, "vqa", cache_dir=cache)
    runs = []
    orig = pred.extractor.run
    pred.extractor.run = lambda images, *a, **k: (runs.append(len(images)),
                                                  orig(images, *a, **k))[1]
    img = world["images"][1]
    res = pred.answer([{"image": img, "question": q} for q in QUESTIONS * 2])
    assert len(res) == 10 and runs == [1] and pred.detector_images == 1
    pred.answer([{"image": img, "question": "is there a dog?"}])
    copy = str(tmp_path / "same_bytes_other_name.png")
    shutil.copy(img, copy)
    again = pred.answer([{"image": copy, "question": QUESTIONS[0]}])[0]
    assert runs == [1] and pred.cache.hits["memory"] >= 2        # content, not name
    _same_answer(again.answer, res[0].answer)
    # the disk cache: a new predictor runs no detector for it, with the same features
    fresh = _predictor(world, "vqa", cache_dir=cache)
    got = fresh.answer([{"image": img, "question": QUESTIONS[0]}])[0]
    assert fresh.detector_images == 0 and fresh.cache.hits["disk"] == 1
    _same_answer(got.answer, res[0].answer)
    np.testing.assert_array_equal(got.request["images"][0].features,
                                  res[0].request["images"][0].features)
    # another box rule is another cache entry
    other = _predictor(world, "vqa", cache_dir=cache, max_bb=5)
    other.answer([{"image": img, "question": QUESTIONS[0]}])
    assert other.detector_images == 1
    assert other.answer([{"image": img, "question": "a"}])[0].request["images"][0].num_boxes <= 5
    # a broken cache file is extracted again (and rewritten)
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(cache) for f in fs]
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"not an npz")
    broken = _predictor(world, "vqa", cache_dir=cache)
    assert broken.answer([{"image": img, "question": "a"}])[0].answer["answer"] in ANSWERS
    assert broken.detector_images == 1


# ----------------------------------------------------------------------------- command line


def test_command_line_one_request_and_a_requests_file(world, tmp_path, capsys):
    img = world["images"][2]
    assert predict_main(_cli(world, "vqa", "--image", img, "--question", QUESTIONS[0],
                             "--alignment")) == 0
    one = json.loads(capsys.readouterr().out.strip())
    want = _predictor(world, "vqa").answer([{"image": img, "question": QUESTIONS[0]}])[0]
    assert one["answer"] == want.answer["answer"] and one["images"] == [img]
    assert one["score"] == pytest.approx(want.answer["score"], abs=1e-6)
    assert one["alignment"]["words"] == QUESTIONS[0].split()
    # a requests file, image paths relative to it; pictures; one bad request kept going
    req_dir = tmp_path / "reqs"
    req_dir.mkdir()
    shutil.copy(img, req_dir / "kitchen.png")
    lines = [{"id": "q1", "image": "kitchen.png", "question": QUESTIONS[0]},
             {"image": "kitchen.png", "question": QUESTIONS[1]},
             {"id": "q3", "image": "missing.png", "question": QUESTIONS[2]},
             {"id": "q1", "image": "kitchen.png", "question": QUESTIONS[3]}]
    path = req_dir / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = str(tmp_path / "answers.jsonl")
    argv = _cli(world, "vqa", "--requests", str(path), "--output", out, "--draw_dir",
                str(tmp_path / "pics"))
    assert predict_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: image {req_dir / 'missing.png'}: no such file" in err
    assert not os.path.exists(out)
    assert predict_main(argv + ["--keep_going"]) == 1
    with open(out) as f:
        got = [json.loads(x) for x in f]
    assert [g["id"] for g in got] == ["q1", 1, "q3", "q1"]
    assert got[0]["answer"] == want.answer["answer"] and "error" in got[2]
    assert [os.path.basename(g.get("picture", "")) for g in got] == \
        ["q1.png", "1.png", "", "request3.png"]            # a repeated id: by number
    assert all(os.path.exists(g["picture"]) for g in got if "picture" in g)
    assert predict_main(argv + ["--keep_going"]) == 2          # the output exists
    assert "already exist" in capsys.readouterr().err


def test_compile_gives_the_eager_answers(world, tmp_path, capsys):
    """``--compile`` (as infer's): the task model compiles at its first batch and answers as
    the eager model; the summary line carries dynamo's counts (cleared before the compiled
    run: an ignored --compile would count 0 compilations)."""
    req_dir = tmp_path / "reqs"
    req_dir.mkdir()
    lines = [{"id": f"q{k}", "image": world["images"][1 + k % len(IMAGES)], "question": q}
             for k, q in enumerate(QUESTIONS)]
    path = req_dir / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got, summary = {}, {}
    for name, extra in (("eager", ["--no-compile"]),
                        ("compiled", ["--compile", "--compile_backend", "aot_eager"])):
        torch._dynamo.utils.counters.clear()
        out = str(tmp_path / f"{name}.jsonl")
        assert predict_main(_cli(world, "vqa", "--requests", str(path), "--output", out,
                                 "--batch_size", "3", *extra)) == 0
        summary[name] = capsys.readouterr().err.strip().splitlines()[-1]
        with open(out) as f:
            got[name] = {r["id"]: r for r in map(json.loads, f)}
    assert "compile" not in summary["eager"]
    found = re.search(r"; compile (\{.*\})$", summary["compiled"])
    assert found, summary["compiled"]
    counts = json.loads(found.group(1))
    assert counts["compilations"] >= 1 and counts["graph_breaks"] == 0, counts
    assert sorted(got["compiled"]) == sorted(got["eager"]) == [f"q{k}" for k in range(5)]
    for rid, want in got["eager"].items():
        have = got["compiled"][rid]
        assert have["answer"] == want["answer"]
        assert [t["answer"] for t in have["top"]] == [t["answer"] for t in want["top"]]
        assert have["score"] == pytest.approx(want["score"], rel=1e-4)
        assert [t["logit"] for t in have["top"]] == pytest.approx(
            [t["logit"] for t in want["top"]], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- errors


def test_clear_errors(world, tmp_path, capsys):
    img = world["images"][1]

    def fails(argv, *needles):
        assert predict_main(argv) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    fails(_cli(world, "vqa", "--image", str(tmp_path / "nope.jpg"), "--question", "a"),
          "command line: image", "nope.jpg: no such file")
    notimg = tmp_path / "notes.png"
    notimg.write_text("not an image")
    fails(_cli(world, "vqa", "--image", str(notimg), "--question", "a"),
          "notes.png", "not an image PIL can read")
    fails(_cli(world, "vqa", "--image", img, "--question", " ".join(["dog"] * 70)),
          "the question is 72 tokens with [CLS]/[SEP], more than the model takes (64",
          "uniter-tiny")
    fails(_cli(world, "vqa", "--image", img), "no 'question'")
    fails(_cli(world, "nlvr2", "--image", img, "--statement", "two dogs"),
          "task nlvr2 takes 2 images", "got 1")
    # a checkpoint of another task, named by its head
    fails(["--task", "vqa", "--checkpoint", world["pt"]["re"], "--config", world["cfg"]["re"],
           "--detector", world["detector"], "--vocab", world["vocab"], "--image", img,
           "--question", "a", *CLI_SIZES],
          f"--checkpoint {world['pt']['re']} cannot be loaded as a vqa model",
          "head of: re (re_output.*)")
    # a detector whose features are not the model's width
    cfg = json.load(open(world["cfg"]["vqa"]))
    wide = str(tmp_path / "wide.json")
    json.dump(dict(cfg, img_dim=2048), open(wide, "w"))
    fails(["--task", "vqa", "--checkpoint", world["pt"]["vqa"], "--config", wide, "--detector",
           world["detector"], "--vocab", world["vocab"], "--image", img, "--question", "a",
           *CLI_SIZES], "cannot be loaded as a vqa model")   # the weights are 128 wide
    with pytest.raises(PredictError, match=r"region features are 128 wide, but the model .* "
                                           r"takes img_dim 2048"):
        task = get_task("vqa")
        c = dict(cfg, img_dim=2048)
        task.check_config(c)
        pt = str(tmp_path / "wide.pt")
        torch.save(task.blank_model(c).state_dict(), pt)
        Predictor("vqa", pt, world["detector"], vocab=world["vocab"], config=wide, **SIZES)
    # requests files: a bad line, a wrong field type, options that exclude each other
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": img, "question": "a"}) + "\n{not json\n")
    fails(_cli(world, "vqa", "--requests", str(bad)), f"{bad}:2: not a JSON line")
    bad.write_text(json.dumps({"image": img, "question": ["a"]}) + "\n")
    fails(_cli(world, "vqa", "--requests", str(bad)), f"{bad}:1: 'question' must be a text")
    fails(_cli(world, "vqa", "--requests", str(bad), "--image", img), "--requests", "excludes")
    fails(_cli(world, "vqa", "--image", img, "--question", "a", "--num_bb", "5", "--max_bb",
               "3"), "--num_bb (a fixed box count) excludes --max_bb")
    other_vocab = tmp_path / "big_vocab.txt"
    other_vocab.write_text("\n".join(_vocab() + [f"w{i}" for i in range(200)]) + "\n")
    fails(["--task", "vqa", "--checkpoint", world["pt"]["vqa"], "--config",
           world["cfg"]["vqa"], "--detector", world["detector"], "--vocab", str(other_vocab),
           "--image", img, "--question", "a", *CLI_SIZES],
          f"the vocabulary has {len(_vocab()) + 200} tokens, the model's word embeddings 128")


# ----------------------------------------------------------------------------- pictures


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_re_picture_boxes_and_heat_map(world, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "objects_vocab.txt").write_text(
        "\n".join(f"thing{i},synonym" for i in range(TINY["classes"])) + "\n")
    (labels / "attributes_vocab.txt").write_text(
        "\n".join(f"shade{i}" for i in range(TINY["attrs"])) + "\n")
    pred = _predictor(world, "re", labels=str(labels))
    [res] = pred.answer([{"image": world["images"][1], "text": "the man on the left"}])
    out = str(tmp_path / "re.png")
    layout = pred.draw(res, out, image_size=300)
    px = _pixels(out)
    assert px.shape[:2] == (layout.size[1], layout.size[0])
    h, w = IMAGES[1]
    p0 = layout.panels[0]
    assert (p0.w, p0.h) == (300, round(h * 300 / w)) and p0.kind == "regions"
    # the chosen box (drawn last): its outline in the chosen colour exactly where the box is
    # (but under its own label), and that colour nowhere else but the label
    chosen = [b for b in layout.boxes if b.colour == draw_lib.CHOSEN]
    assert len(chosen) == 1 and chosen[0].region == res.answer["region"]
    box = res.request["images"][0].boxes[res.answer["region"]]
    assert chosen[0].rect == p0.to_canvas(box)
    outline, label = _outline_mask(px, chosen[0])
    colour = np.array(draw_lib.CHOSEN)
    is_colour = (px == colour).all(axis=-1)
    assert outline.sum() > 40 and is_colour[outline & ~label].all()
    assert not is_colour[~(outline | label)].any()
    # runners-up in their colour, regions labelled with the given names
    assert any(b.colour == draw_lib.RUNNER_UP for b in layout.boxes)
    plain = [b for b in layout.boxes if b.colour in draw_lib.PALETTE]
    assert plain and all("shade" in b.label and "thing" in b.label for b in plain)
    # the heat map: every cell is the plan (read back through the colormap)
    al = res.alignment
    hm = layout.heatmap
    assert (hm.rows, hm.cols) == al.plan.shape == (5, res.request["images"][0].num_boxes)
    assert hm.vmax == pytest.approx(al.plan.max())
    for r in range(hm.rows):
        for c in range(hm.cols):
            cx1, cy1, cx2, cy2 = hm.cell(r, c)
            for yy, xx in ((cy1, cx1), (cy2, cx2), ((cy1 + cy2) // 2, (cx1 + cx2) // 2)):
                v = draw_lib.colormap_index(px[yy, xx]) / 255 * hm.vmax
                assert v == pytest.approx(al.plan[r, c], abs=hm.vmax / 255 + 1e-9), (r, c)
    # each word's strongest region outlined in its first word's colour on the alignment
    # panel; the last one drawn is on top: its whole outline in that colour
    aligned = [b for b in layout.boxes if layout.panels[b.panel].kind == "alignment"]
    best = al.strongest()
    for b in aligned:
        ws = [w for w, c in enumerate(best) if al.regions[c][1] == b.region]
        assert ws and b.label == ", ".join(al.words[w] for w in ws)
        assert b.colour == draw_lib.WORD_PALETTE[ws[0] % len(draw_lib.WORD_PALETTE)]
    assert sorted(b.region for b in aligned) == sorted({al.regions[c][1] for c in best})
    outline, label = _outline_mask(px, aligned[-1])
    assert (px == np.array(aligned[-1].colour)).all(axis=-1)[outline & ~label].all()


def _outline_mask(px, box):
    """(outline band, label rectangle) of a drawn box as boolean masks over the picture."""
    x1, y1, x2, y2 = box.rect
    yy, xx = np.mgrid[0:px.shape[0], 0:px.shape[1]]
    inside = (xx >= x1) & (xx <= x2) & (yy >= y1) & (yy <= y2)
    core = ((xx >= x1 + box.width) & (xx <= x2 - box.width) & (yy >= y1 + box.width)
            & (yy <= y2 - box.width))
    label = np.zeros_like(inside)
    if box.label_rect is not None:
        lx1, ly1, lx2, ly2 = box.label_rect
        label = (xx >= lx1) & (xx <= lx2) & (yy >= ly1) & (yy <= ly2)
    return inside & ~core, label


def test_alignment_is_uniters_wra_plan(world):
    """The plan and distance against the reference IPOT and the WRA op on the same hidden
    states (the ITM/WRA objective's computation)."""
    pred = _predictor(world, "itm")
    [res] = pred.answer([{"image": world["images"][3], "text": ["a dog on the sofa", "a cat"]}])
    al = pred.align(res)
    batch, words, regions = pred.task.predict_alignment(res.request, res.answer, pred.ctx)
    with torch.no_grad():
        seq = pred.model.uniter(batch["input_ids"], batch["position_ids"], batch["img_feat"],
                                batch["img_pos_feat"], batch["attn_masks"],
                                batch["gather_index"], output_all_encoded_layers=False)
    tl = batch["input_ids"].size(1)
    txt, img = seq[:, :tl].float(), seq[:, tl:].float()
    tp = torch.zeros(1, tl, dtype=torch.bool)
    ip = torch.zeros(1, img.size(1), dtype=torch.bool)
    plan = reference.ot.ipot(reference.ot.cost_matrix_cosine(txt, img), tp, ip)[0].t().numpy()
    np.testing.assert_allclose(al.token_plans[0], plan, atol=1e-6)
    assert al.distances[0] == pytest.approx(
        float(ops.optimal_transport_dist(txt, img, tp, ip)[0]), abs=1e-5)
    assert al.words == res.answer["answer"].split()
    assert al.plan.sum() == pytest.approx(plan[1:-1].sum(), abs=1e-6)   # [CLS]/[SEP] left out
    assert abs(plan.sum() - 1.0) < 1e-4


@pytest.mark.parametrize("name,fields,images", [
    ("vqa", {"question": "what is on the table?"}, 1),
    ("ve", {"hypothesis": "a dog is on the sofa"}, 1),
    ("nlvr2", {"statement": "two dogs are on the left"}, 2),
    ("nlvr2-triplet", {"statement": "a red sofa"}, 2),
    ("itm", {"text": ["a dog", "two cats on the table", "a man"]}, 1),
    ("vcr", {"question": "what is it?", "answer": ["a dog", "a cat"],
             "rationale": ["it is red", "because"]}, 1)])
def test_every_task_draws(world, tmp_path, name, fields, images):
    pred = _predictor(world, name)
    paths = [world["images"][i] for i in (1, 2)[:images]]
    [res] = pred.answer([{"images": paths, **fields}])
    out = str(tmp_path / f"{name}.png")
    layout = pred.draw(res, out, image_size=200, max_boxes=3)
    px = _pixels(out)
    assert px.shape[:2] == (layout.size[1], layout.size[0])
    kinds = [p.kind for p in layout.panels]
    assert kinds == ["regions"] * images + ["alignment"] * images
    for p in layout.panels:
        h, w = IMAGES[(1, 2)[p.image]]
        assert max(p.w, p.h) == 200 and (p.w, p.h) == (round(w * p.scale), round(h * p.scale))
    al = res.alignment
    n_regions = sum(im.num_boxes for im in res.request["images"])
    assert al.plan.shape[1] == n_regions and {i for i, _ in al.regions} == set(range(images))
    pic = pred.task.predict_picture(res.request, res.answer)
    assert pic["ranked"] and pic["title"]
    # no alignment: one row of panels
    _, lay2 = pred.picture(res, alignment=False)
    assert lay2.heatmap is None and len(lay2.panels) == images


def test_labels_and_colormap(tmp_path):
    assert Labels().region(3, 1) == "attr 1 obj 3" and Labels().region(3, None) == "obj 3"
    (tmp_path / "objects_vocab.txt").write_text("man,men\ndog\n")
    lab = load_labels(str(tmp_path))
    assert lab.region(0, None) == "man" and lab.region(1, 0) == "attr 0 dog"
    with pytest.raises(PredictError, match="neither objects_vocab.txt"):
        load_labels(str(_empty(tmp_path)))
    with pytest.raises(PredictError, match="not a folder"):
        load_labels(str(tmp_path / "objects_vocab.txt"))
    for i in range(256):
        assert abs(draw_lib.colormap_index(draw_lib.LUT[i]) - i) <= 1
    assert (draw_lib.colormap(np.array([0.0, 1.0])) == draw_lib.LUT[[0, 255]]).all()
    assert tuple(draw_lib.CHOSEN) not in {tuple(c) for c in draw_lib.LUT}


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_a_run_directory_loads_as_infer_loads_it(world, tmp_path, training_env):
    """A fine-tuning run's directory (DeepSpeed checkpoint, train_config.json, ckpt/
    ans2label.json): the same answers as its .pt; another answer vocabulary refused."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    with open(world["cfg"]["vqa"]) as f:
        cfg = json.load(f)
    train = dict(cfg, train_txt_dbs=["unused"], train_img_dbs=["unused"], output_dir=str(run),
                 num_train_steps=1, train_batch_size=8, checkpoint=None)
    train_path = str(tmp_path / "train_config.json")
    with open(train_path, "w") as f:
        json.dump(train, f)
    with open(os.path.join(root, "ds.json")) as f:
        ds = dict(json.load(f), bf16={"enabled": False})     # fp32: the .pt's very weights
    ds_path = str(tmp_path / "ds_fp32.json")
    with open(ds_path, "w") as f:
        json.dump(ds, f)
    p = subprocess.run([sys.executable, "-m", "uniter_fast.export", "from-pt", world["pt"]["vqa"],
                        str(run / "ckpt"), "--task", "vqa", "--config", train_path,
                        "--deepspeed_config", ds_path], cwd=root, env=dict(training_env),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.copy(train_path, run / "train_config.json")
    reqs = [{"image": world["images"][i], "question": q} for i, q in zip((1, 3), QUESTIONS)]
    from_run = Predictor("vqa", str(run), world["detector"], vocab=world["vocab"],
                         detector_batch_size=1, **SIZES).answer(reqs)
    from_pt = _predictor(world, "vqa").answer(reqs)
    for a, b in zip(from_run, from_pt):
        _same_answer(a.answer, b.answer)
    other = str(tmp_path / "other_a2l.json")
    with open(other, "w") as f:
        json.dump({a: i for i, a in enumerate(reversed(ANSWERS))}, f)
    with pytest.raises(PredictError, match="is not the answer vocabulary the run was trained"):
        Predictor("vqa", str(run), world["detector"], vocab=world["vocab"],
                  options={"ans2label": other}, **SIZES)
