"""The walk-through's generated inputs: the demo scenes and questions, the vocabulary, the
small detector with generated weights (loaded strictly, UNITER's feature widths)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from uniter_fast import demo
from uniter_fast.detector import Extractor, load_detector
from uniter_fast.detector.config import PRESETS, DetectorConfig
from uniter_fast.detector.generated import SMALL_NETWORK, generated_detector, save_hf_layout
from uniter_fast.prepro import BertTokenizer, load_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scenes_answer_their_questions():
    rng = np.random.default_rng(3)
    for _ in range(20):
        img, objects = demo.make_scene(rng, 200, 260)
        assert img.size == (260, 200) and 1 <= len(objects) <= 3
        pix = np.asarray(img).astype(int)
        for shape, colour, (x1, y1, x2, y2) in objects:
            # the shape's centre pixel has its colour (circle, square; a triangle's centroid)
            cx, cy = (x1 + x2) // 2, (y1 + 2 * y2) // 3 if shape == "triangle" else (y1 + y2) // 2
            assert tuple(pix[cy, cx]) == demo.COLOURS[colour]
        for b1 in objects:
            for b2 in objects:
                if b1 is not b2:
                    a, b = b1[2], b2[2]
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        qa = dict(demo.questions_for(objects, rng))
        assert qa["how many shapes are there?"] == demo.NUMBERS[len(objects)]
        for q, a in qa.items():
            if q.startswith("what color is the "):
                shape = q[len("what color is the "):-1]
                assert [c for s, c, _ in objects if s == shape] == [a]
            if q.startswith("what shape is "):
                colour = q[len("what shape is "):-1]
                assert [s for s, c, _ in objects if c == colour] == [a]


def test_demo_files_and_vocabulary(tmp_path):
    paths = demo.write_demo(str(tmp_path), num_images=6, steps=7, detector=False)
    images = sorted(os.listdir(tmp_path / "images"))
    assert len(images) == 6 and any(n.endswith(".png") for n in images)
    tok = BertTokenizer(load_vocab(paths["vocab"]))
    vocab = open(paths["vocab"]).read().split()
    assert len(vocab) <= json.load(open(os.path.join(ROOT, "uniter_fast", "configs",
                                                     "uniter-tiny.json")))["vocab_size"]
    unk = vocab.index("[UNK]")
    rows = [json.loads(line) for split in ("train", "val") for line in open(paths[split])]
    assert rows and {r["image"] for r in rows} <= set(images)
    for r in rows:
        assert unk not in tok.tokenize(r["question"]), r["question"]
        assert len(r["answers"]) == 10
    cfg = json.load(open(paths["config"]))
    assert cfg["num_train_steps"] == 7 and cfg["img_dim"] == 2048
    assert cfg["train_img_dbs"] == [str(tmp_path / "img_db")]


def test_demo_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    p = subprocess.run([sys.executable, "-m", "uniter_fast.demo", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "not empty" in p.stderr
    assert (tmp_path / "mine.txt").read_text() == "x"


def test_generated_detector_loads_strictly_with_uniters_widths(tmp_path):
    model = generated_detector(seed=1)
    path = save_hf_layout(model, str(tmp_path / "det"))
    loaded = load_detector(path)
    assert loaded.weights_layout == "torch"
    assert loaded.cfg.res5_channels == 2048 and loaded.cfg.label_dim == 1601
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert loaded.cfg.blocks == SMALL_NETWORK["blocks"]
    small = Extractor(load_detector(path, DetectorConfig().with_preset("small")), min_bb=3,
                      max_bb=20)
    assert small.cfg.rpn_post_nms_topk == PRESETS["small"]["rpn_post_nms_topk"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3),
                                                            dtype=np.uint8))
    [rec] = small([img])
    assert rec["features"].shape[1] == 2048 and rec["soft_labels"].shape[1] == 1601
    assert 3 <= len(rec["conf"]) <= 20 and np.isfinite(rec["features"]).all()
    # varied boxes: the damped RPN spreads proposals over the image
    assert len({tuple(np.round(b)) for b in rec["boxes"]}) == len(rec["boxes"])


@pytest.mark.parametrize("args,message", [(["--num_images", "1"], "--num_images")])
def test_demo_bad_arguments(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "uniter_fast.demo", "--out", str(tmp_path / "d"),
                        *args], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and message in p.stderr
