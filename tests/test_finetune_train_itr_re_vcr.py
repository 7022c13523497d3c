"""Retrieval, RE and VCR fine-tuning commands end to end: ``finetune.py --task {itm,itm-hn,re,vcr}`` on the
synthetic defaults (shortened), measured against chance, and ``python -m uniter_fast.infer``
on the runs' checkpoints writing the original's result files (checked against the files'
own contents and the trainer's numbers).

Starts from the cached synthetic pretraining run (shared with the VQA/VE/NLVR2 tests through
the same ``UNITER_FAST_CACHE``: one pretraining run per session)."""
import csv
import json
import os
import pickle
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT = os.path.join(ROOT, "uniter_fast", "finetune.py")
DS = os.path.join(ROOT, "ds.json")

pytestmark = pytest.mark.slow


def _export_round_trip(task, out, tmp_path, env):
    """to-pt writes exactly the original's keys and shapes (independent layout), the plain
    dict loads strictly, and from-pt builds a DeepSpeed checkpoint of the same weights."""
    import torch
    from oracle_itr_re_vcr import layout

    from uniter_fast.config import config_path
    from uniter_fast.model.model import UniterConfig
    pt = str(tmp_path / f"{task}.pt")
    _run(["-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"), pt, "--task", task],
         env)
    sd = torch.load(pt, weights_only=True)
    ucfg = UniterConfig.from_json_file(config_path("uniter-tiny"))
    want = layout(task, ucfg, 2048)
    assert sorted((k, tuple(v.shape)) for k, v in sd.items()) == sorted(want)
    from uniter_fast.tasks import get_task
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    get_task(task).make_model(dict(cfg, checkpoint_from="pretrain")).load_state_dict(
        sd, strict=True)
    back = str(tmp_path / "back" / "ckpt")
    _run(["-m", "uniter_fast.export", "from-pt", pt, back, "--task", task, "--config",
          os.path.join(out, "train_config.json"), "--deepspeed_config", DS], env)
    pt2 = str(tmp_path / f"{task}2.pt")
    _run(["-m", "uniter_fast.export", "to-pt", back, pt2, "--task", task], env)
    sd2 = torch.load(pt2, weights_only=True)
    assert sd2.keys() == sd.keys()
    # an fp32 checkpoint (from-pt where bf16 is emulated) gives the weights back exactly; in
    # bf16 DeepSpeed builds the fp32 masters from the bf16 module: bf16 rounding
    from uniter_fast import checkpoint as ckpt_lib
    with open(os.path.join(back, "latest")) as f:
        precision = ckpt_lib.stored_settings(back, f.read().strip())["precision"]
    for k in sd:
        want = sd[k] if precision == "fp32" else sd[k].to(getattr(torch, {
            "bf16": "bfloat16", "fp16": "float16"}[precision])).to(sd[k].dtype)
        assert torch.equal(sd2[k], want), (k, precision)

#: task -> (steps, {metric: minimum}); chance: ITM R@1 1/100 (images) and ~0.02 (texts),
#: RE 1/6 (detected boxes), VCR Q->A 1/4, QA->R 1/4, joint 1/16
TARGETS = {
    "itm": (60, {"val/img_r1": 0.4, "val/txt_r1": 0.4}),
    "itm-hn": (8, {"val/img_r1": 0.4, "val/txt_r1": 0.4}),
    "re": (200, {"val/acc": 0.6, "test/acc": 0.6}),
    "vcr": (300, {"val/acc_qa": 0.33, "val/acc_qar": 0.6, "val/acc": 0.2}),
}


@pytest.fixture(scope="module")
def env(training_env):
    return dict(training_env)     # conftest: the shared cache, no outer launcher's variables


def _run(args, env, timeout=1500):
    p = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _train(task, env, out):
    n, _ = TARGETS[task]
    _run([FT, "--task", task, "--deepspeed_config", DS, "--output_dir", out,
          "--precision", "fp32", "--num_train_steps", str(n), "--valid_steps", str(n), "--save_steps", str(n),
          "--no_progress"], env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    val = [r for r in recs if r.get("event") == "validation"][-1]
    end = [r for r in recs if r.get("event") == "end"][-1]
    return cfg, val, end


def _check_targets(task, val, end):
    n, mins = TARGETS[task]
    report = f"{task}: {json.dumps({k: round(val[k], 3) for k in mins})} after {n} steps " \
             f"({end['train_wall_s']:.0f} s)"
    print(report)
    for k, v in mins.items():
        assert val[k] >= v, report


@pytest.mark.parametrize("task", ["itm", "itm-hn"])
def test_retrieval_learns_and_infers(env, tmp_path, task):
    out = str(tmp_path / "run")
    cfg, val, end = _train(task, env, out)
    _check_targets(task, val, end)
    n = TARGETS[task][0]
    with open(os.path.join(out, "results_val", f"scores_{n}.json")) as f:
        assert json.load(f) == {k[4:]: v for k, v in val.items() if k.startswith("val/")}
    # inference on the test split: the original's files; recalls equal the trainer's
    inf = str(tmp_path / "inf")
    _run(["-m", "uniter_fast.infer", "--task", "itm", "--checkpoint", out,
          "--txt_db", cfg["test_txt_db"], "--img_db", cfg["test_img_db"],
          "--output_dir", inf], env)
    with open(os.path.join(inf, "scores.json")) as f:
        scores = json.load(f)
    assert set(scores) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5",
                           "img_r10", "img_r_mean", "r_mean"}
    for k, v in scores.items():
        assert v == pytest.approx(val[f"test/{k}"], abs=1e-6)
    with open(os.path.join(inf, "results.bin"), "rb") as f:
        matrix, txt_ids, img_ids = pickle.load(f)
    assert tuple(matrix.shape) == (len(txt_ids), len(img_ids)) == (100, 50)
    # image R@1 recomputed from the matrix by hand: the per-query recall (a caption hits
    # when no image scores strictly higher than its own, see itm_eval), exactly
    from uniter_fast.data.db import TxtTokLmdb
    t2i = TxtTokLmdb(cfg["test_txt_db"], -1).txt2img
    r1 = sum(not bool((matrix[r] > matrix[r, img_ids.index(t2i[t])]).any())
             for r, t in enumerate(txt_ids)) / len(txt_ids)
    assert r1 == pytest.approx(scores["img_r1"], abs=1e-9)
    assert os.path.exists(os.path.join(inf, "config.json"))


def test_zero_shot_retrieval_from_the_pretraining_checkpoint(env, tmp_path):
    from uniter_fast.tasks import get_task
    from uniter_fast.tasks.base import default_config, resolve_synthetic
    from uniter_fast.training.synthetic_pretrain import ensure_synthetic_pretrain
    with open(default_config("itm")) as f:
        cfg = json.load(f)
    old = os.environ.get("UNITER_FAST_CACHE")
    os.environ["UNITER_FAST_CACHE"] = env["UNITER_FAST_CACHE"]
    try:
        pt = ensure_synthetic_pretrain(cfg, DS, "fp32", progress=False)
        txt = resolve_synthetic("synthetic-itm:val", get_task("itm"), cfg)
        img = resolve_synthetic("synthetic-itm:img", get_task("itm"), cfg)
    finally:
        if old is None:
            os.environ.pop("UNITER_FAST_CACHE")
        else:
            os.environ["UNITER_FAST_CACHE"] = old
    inf = str(tmp_path / "zs")
    p = _run(["-m", "uniter_fast.infer", "--task", "itm", "--checkpoint", pt,
              "--config", default_config("itm"), "--txt_db", txt, "--img_db", img,
              "--output_dir", inf], env)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["zero_shot"] is True and summary["pairs"] == 200 * 100
    assert "pair/s" in p.stderr                      # the progress bar's rate
    with open(os.path.join(inf, "scores.json")) as f:
        scores = json.load(f)
    print("zero-shot", scores)
    assert scores["img_r1"] > 0.2 and scores["txt_r1"] > 0.2    # chance 0.01 / 0.02


def _iou(a, b):
    """IoU of two [x, y, w, h] boxes (written out again here)."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_re_learns_and_infers(env, tmp_path):
    out = str(tmp_path / "run")
    cfg, val, end = _train("re", env, out)
    _check_targets("re", val, end)
    inf = str(tmp_path / "inf")
    _run(["-m", "uniter_fast.infer", "--task", "re", "--checkpoint", out,
          "--txt_db", cfg["val_txt_db"], "--img_db", cfg["val_img_db"],
          "--output_dir", inf], env)
    files = os.listdir(inf)
    assert len(files) == 1 and files[0].endswith("_val_on_det_all.json"), files
    with open(os.path.join(inf, files[0])) as f:
        preds = json.load(f)
    assert all(set(p) == {"sent_id", "pred_box", "tgt_box"} and isinstance(p["sent_id"], int)
               and len(p["pred_box"]) == len(p["tgt_box"]) == 4 for p in preds)
    assert len({p["sent_id"] for p in preds}) == len(preds) == 300
    acc = sum(_iou(p["pred_box"], p["tgt_box"]) > 0.5 for p in preds) / len(preds)
    assert acc == pytest.approx(val["val/acc"], abs=1e-9)
    n = TARGETS["re"][0]
    with open(os.path.join(out, "results_val", f"results_{n}_all.json")) as f:
        assert sorted(json.load(f), key=lambda p: p["sent_id"]) == \
            sorted(preds, key=lambda p: p["sent_id"])
    _export_round_trip("re", out, tmp_path, env)


def test_vcr_learns_and_writes_the_leaderboard_csv(env, tmp_path):
    out = str(tmp_path / "run")
    from uniter_fast.data.synthetic_tasks.vcr import vcr_baselines
    cfg, val, end = _train("vcr", env, out)
    print("vcr baselines", vcr_baselines(cfg["val_txt_db"]))
    _check_targets("vcr", val, end)
    n = TARGETS["vcr"][0]
    # the test split has no labels: the trainer wrote its CSV and no test metrics
    assert not any(k.startswith("test/") for k in val)
    assert os.path.exists(os.path.join(out, "results_test", f"results_{n}_all.csv"))
    inf = str(tmp_path / "inf")
    _run(["-m", "uniter_fast.infer", "--task", "vcr", "--checkpoint", out,
          "--txt_db", cfg["test_txt_db"], "--img_db", cfg["test_img_db"],
          "--output_dir", inf], env)
    tag = f"global_step{n}"
    with open(os.path.join(inf, f"results_{tag}_all.csv")) as f:
        rows = list(csv.reader(f))
    head = rows[0]
    assert head[:5] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3"]
    assert head[5:] == [f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4)]
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == 100 and ids == sorted(ids, key=lambda q: int(q.split("-")[1]))
    with open(os.path.join(inf, f"results_{tag}_all.json")) as f:
        scores = json.load(f)
    for r in rows[1:]:
        assert [float(x) for x in r[1:]] == pytest.approx(scores[r[0]], rel=1e-6)
    # the same CSV as the trainer's own test pass at the last step
    with open(os.path.join(out, "results_test", f"results_{n}_all.csv")) as f:
        trained = list(csv.reader(f))
    assert trained[0] == head and [r[0] for r in trained[1:]] == ids
    for a, b in zip(trained[1:], rows[1:]):
        assert [float(x) for x in a[1:]] == pytest.approx([float(x) for x in b[1:]], abs=1e-4)
    _export_round_trip("vcr", out, tmp_path, env)
