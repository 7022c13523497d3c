"""Inference and fine-tuning inputs that used to mislead or lose work (issue #19): result
files are never replaced silently and carry the db in their default name, an answer
vocabulary other than the run's is refused, a checkpoint of another size is named as such,
no "randomly initialised" notice before loading, bad sizes are refused before any work,
validation texts longer than the position table fail before the first step, a run
directory works as fine-tuning ``--checkpoint``.  Small synthetic VQA data and random
weights: no training."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from faultutil import ROOT

from uniter_fast.data.db import TxtTokLmdb, write_txt_db
from uniter_fast.data.synthetic import SyntheticSpec
from uniter_fast.data.synthetic_tasks import ensure_task_dbs, make_spec, vqa
from uniter_fast.data.vqa import load_ans2label
from uniter_fast.model.build import load_model_config
from uniter_fast.tasks import get_task

WORLD = SyntheticSpec(max_bb=6, min_bb=6)
BOX = {"conf_th": 0.2, "max_bb": 6, "min_bb": 6, "num_bb": 36}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("uf_infer_cache"))
    return ensure_task_dbs(vqa, make_spec(vqa, dict(num_train=4, num_val=6, per_item=2)),
                           WORLD, cache_dir=cache)


@pytest.fixture(scope="module")
def ds_fp32(tmp_path_factory):
    """ds.json in fp32 (from-pt then keeps the weights exactly, on any CPU)."""
    ds = json.load(open(os.path.join(ROOT, "ds.json")))
    for k in ("bf16", "fp16"):
        ds[k] = {"enabled": False}
    path = str(tmp_path_factory.mktemp("uf_infer_ds") / "ds_fp32.json")
    json.dump(ds, open(path, "w"))
    return path


def _from_pt(pt, run, cfg, ds):
    p = subprocess.run([sys.executable, "-m", "uniter_fast.export", "from-pt", pt,
                        str(run / "ckpt"), "--task", "vqa", "--config", cfg,
                        "--deepspeed_config", ds], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _cfg(**kw):
    return dict({"model_config": "uniter-tiny", **BOX}, **kw)


@pytest.fixture(scope="module")
def vqa_pt(tmp_path_factory):
    """A VQA model file (random weights, the shipped 3129 answers) and its training config."""
    d = tmp_path_factory.mktemp("uf_infer_model")
    task = get_task("vqa")
    cfg = _cfg()
    torch.manual_seed(0)
    task.ans2label(cfg)
    pt = str(d / "vqa.pt")
    torch.save(task.blank_model(cfg).state_dict(), pt)
    # the shipped synthetic VQA config: uniter-tiny and the box rule of _cfg()
    from uniter_fast.tasks.base import default_config
    full = json.load(open(default_config("vqa")))
    assert all(full[k] == v for k, v in cfg.items())
    cfg_path = str(d / "train_config.json")
    with open(cfg_path, "w") as f:
        json.dump(full, f)
    return pt, cfg_path


def _infer(args, env=None, ok=True):
    p = subprocess.run([sys.executable, "-m", "uniter_fast.infer", "--no_progress", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _vqa_args(data, pt, cfg, *extra):
    return ["--task", "vqa", "--checkpoint", pt, "--config", cfg, "--txt_db", data["val"],
            "--img_db", data["img"], *extra]


def test_results_are_never_replaced_without_overwrite(data, vqa_pt, tmp_path):
    pt, cfg = vqa_pt
    out = str(tmp_path / "answers.json")
    p = _infer(_vqa_args(data, pt, cfg, "--output", out))
    assert "randomly initialised" not in p.stderr          # the weights are loaded next
    first = open(out).read()
    assert len(json.loads(first)) == 12
    p = _infer(_vqa_args(data, pt, cfg, "--output", out), ok=False)
    assert p.returncode != 0 and "already exist" in p.stderr and "--overwrite" in p.stderr
    assert open(out).read() == first                      # untouched
    _infer(_vqa_args(data, pt, cfg, "--output", out, "--overwrite"))
    assert json.loads(open(out).read()) == json.loads(first)
    # the default name carries the db: another db does not replace this one's answers
    p = _infer(_vqa_args(data, pt, cfg))
    default = json.loads(p.stdout.strip().splitlines()[-1])["output"]
    assert os.path.basename(default) == "vqa_results_vqa_txt_val.json"
    # a directory as --output: refused, nothing left beside it
    d = tmp_path / "a_dir"
    d.mkdir()
    p = _infer(_vqa_args(data, pt, cfg, "--output", str(d)), ok=False)
    assert p.returncode != 0 and "is a directory" in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "answers.json"]


def test_another_answer_vocabulary_is_refused(data, vqa_pt, ds_fp32, tmp_path):
    pt, cfg = vqa_pt
    # a run directory whose ckpt/ans2label.json is the shipped vocabulary
    run = tmp_path / "run"
    _from_pt(pt, run, cfg, ds_fp32)
    shipped = load_ans2label()
    assert json.load(open(run / "ckpt" / "ans2label.json")) == shipped
    with open(run / "train_config.json", "w") as f:
        json.dump(_cfg(), f)
    # the same answers under other ids: every answer would be renamed silently
    names = sorted(shipped, key=shipped.get)
    swapped = dict(shipped)
    swapped[names[0]], swapped[names[1]] = shipped[names[1]], shipped[names[0]]
    other = str(tmp_path / "swapped.json")
    json.dump(swapped, open(other, "w"))
    p = _infer(["--task", "vqa", "--checkpoint", str(run), "--txt_db", data["val"],
                "--img_db", data["img"], "--ans2label", other,
                "--output", str(tmp_path / "x.json")], ok=False)
    assert p.returncode != 0 and "2 answers have other ids" in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x.json")
    # the run's own file is fine
    _infer(["--task", "vqa", "--checkpoint", str(run), "--txt_db", data["val"],
            "--img_db", data["img"], "--ans2label", str(run / "ckpt" / "ans2label.json"),
            "--output", str(tmp_path / "y.json")])
    # a vocabulary of another size for a .pt names --ans2label and both sizes
    small = str(tmp_path / "small.json")
    json.dump({n: i for i, n in enumerate(names[:7])}, open(small, "w"))
    p = _infer(_vqa_args(data, pt, cfg, "--ans2label", small, "--output",
                         str(tmp_path / "z.json")), ok=False)
    assert "--ans2label" in p.stderr and "7 answers" in p.stderr and "3129 rows" in p.stderr


def test_checkpoint_of_another_size_named(data, vqa_pt, tmp_path):
    pt, cfg = vqa_pt
    wide = json.load(open(os.path.join(ROOT, "uniter_fast", "configs", "uniter-tiny.json")))
    wide["hidden_size"] = 32
    path = str(tmp_path / "uniter-narrow.json")
    json.dump(wide, open(path, "w"))
    p = _infer(_vqa_args(data, pt, cfg, "--model_config", path, "--output",
                         str(tmp_path / "o.json")), ok=False)
    assert "hidden size 64" in p.stderr and "has 32" in p.stderr and "uniter-narrow" in p.stderr
    assert "size mismatch" not in p.stderr and "NLVR2" not in p.stderr
    # the same through from_pretrained (fine-tuning from a checkpoint of another size)
    task = get_task("vqa")
    task.ans2label(_cfg())
    with pytest.raises(RuntimeError, match=r"checkpoint hidden size 64, model config .*"
                                           r"uniter-narrow.json has 32"):
        task.make_model(_cfg(model_config=path), torch.load(pt, weights_only=True))


def test_bad_sizes_refused_before_any_work(data, vqa_pt):
    pt, cfg = vqa_pt
    p = _infer(_vqa_args(data, pt, cfg, "--batch_size", "0"), ok=False)
    assert p.returncode == 2 and "--batch_size" in p.stderr and "must be >= 1" in p.stderr
    from uniter_fast.training.config import apply_deepspeed_overrides
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        apply_deepspeed_overrides({"num_train_steps": 1}, {},
                                  argparse.Namespace(gradient_accumulation_steps=0))
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        apply_deepspeed_overrides({"num_train_steps": 1, "gradient_accumulation_steps": 0}, {},
                                  argparse.Namespace())


def test_long_validation_text_fails_before_training(data, tmp_path):
    """A validation text longer than the position table is found before the first step
    (it used to fail at the first validation, after training)."""
    src = TxtTokLmdb(data["val"], -1)
    recs = {i: dict(src[i]) for i in list(src.id2len)[:3]}
    limit = load_model_config(_cfg()).max_position_embeddings
    first = next(iter(recs))
    recs[first]["input_ids"] = (recs[first]["input_ids"] * 100)[:limit]   # + [CLS], [SEP]
    long_db = str(tmp_path / "long_val.db")
    write_txt_db(long_db, recs, src.meta)
    task = get_task("vqa")
    cfg = _cfg(val_txt_db=long_db, val_img_db=data["img"])
    with pytest.raises(ValueError, match=rf"val_txt_db .*long_val.db: its longest text is "
                                         rf"{limit + 2} tokens .* max_position_embeddings {limit}"):
        task.check_eval_texts(load_model_config(cfg), cfg)
    task.check_eval_texts(load_model_config(cfg), _cfg(val_txt_db=data["val"],
                                                       val_img_db=data["img"]))


def test_every_text_too_long_names_max_txt_len(data):
    from uniter_fast.data.db import open_img_db
    from uniter_fast.data.vqa import VqaDataset
    txt = TxtTokLmdb(data["train"], 1)
    assert txt.n_too_long == 8 and not txt.id2len
    with pytest.raises(ValueError, match="8 texts longer than max_txt_len 1 were dropped"):
        VqaDataset(3129, txt, open_img_db(data["img"], _cfg()))


def test_run_directory_as_finetuning_checkpoint(vqa_pt, ds_fp32, tmp_path):
    """A DeepSpeed run directory (or its ckpt/) is a fine-tuning ``checkpoint`` too, as for
    infer: consolidated, not an IsADirectoryError."""
    pt, cfg = vqa_pt
    run = tmp_path / "run"
    _from_pt(pt, run, cfg, ds_fp32)
    from uniter_fast.tasks.base import load_state
    want = torch.load(pt, weights_only=True)
    for path in (run, run / "ckpt"):
        got = load_state({"checkpoint": str(path)})
        assert set(got) == set(want)
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want)


def test_token_id_past_the_vocabulary_names_db_and_record(data, tmp_path):
    from uniter_fast.data.db import DbError
    src = TxtTokLmdb(data["val"], -1)
    recs = {i: dict(src[i]) for i in list(src.id2len)[:2]}
    bad = next(iter(recs))
    recs[bad]["input_ids"] = recs[bad]["input_ids"][:2] + [src.v_range[1]]
    db = str(tmp_path / "vocab.db")
    write_txt_db(db, recs, src.meta)
    txt = TxtTokLmdb(db, -1)
    with pytest.raises(DbError, match=rf"text db .*vocab.db: record '{bad}': input_ids\[2\] is "
                                      rf"{src.v_range[1]}, past the db's vocabulary"):
        txt[bad]
    other = [i for i in recs if i != bad][0]
    assert txt[other]["input_ids"] == recs[other]["input_ids"]


def test_unusable_cache_directory_named(tmp_path):
    not_a_dir = tmp_path / "cache_file"
    not_a_dir.write_text("x")
    with pytest.raises(OSError, match=r"cannot write the cache directory .*cache_file.*"
                                      r"UNITER_FAST_CACHE"):
        ensure_task_dbs(vqa, make_spec(vqa, dict(num_train=2, num_val=2)), WORLD,
                        cache_dir=str(not_a_dir))


def test_nlvr2_inference_csv_is_quoted_like_trainings(tmp_path):
    import csv
    rows = [('dev-1,"odd"-0', "True"), ("dev-2-0", "False")]
    task = get_task("nlvr2")
    path = str(tmp_path / "pred.csv")
    task.write_predictions(path, rows)
    task.write_results(str(tmp_path / "val"), "val", 3, rows)
    with open(path, newline="") as f:
        assert [tuple(r) for r in csv.reader(f)] == rows
    assert open(path).read() == open(tmp_path / "val" / "val_results_3_all.csv").read()


def test_resuming_a_run_as_another_task_is_refused(tmp_path):
    """An itm run resumed as itm-hn (another loader state) used to die with KeyError: 't'."""
    from uniter_fast.tasks.base import default_config
    cfg = json.load(open(default_config("itm")))
    cfg.update(checkpoint=None, num_train_steps=1, valid_steps=1, save_steps=1,
               train_batch_size=4, hard_neg_size=2, output_dir=str(tmp_path / "run"),
               synthetic_task=dict(cfg["synthetic_task"], num_train=12, num_val=6, num_test=6))
    path = str(tmp_path / "itm.json")
    json.dump(cfg, open(path, "w"))
    ft = os.path.join(ROOT, "uniter_fast", "finetune.py")
    env = dict(os.environ, UNITER_FAST_CACHE=str(tmp_path / "cache"))

    def run(task, *extra):
        return subprocess.run([sys.executable, ft, "--task", task, "--config", path,
                               "--deepspeed_config", os.path.join(ROOT, "ds.json"),
                               "--precision", "fp32", "--no_progress", *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    p = run("itm")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run("itm-hn", "--resume", "--num_train_steps", "2", "--allow_config_change")
    assert p.returncode != 0
    assert "is a checkpoint of a 'itm' run; this command runs 'itm-hn'" in p.stderr, \
        p.stderr[-3000:]
    assert "KeyError" not in p.stderr


def test_vcr_inference_on_an_empty_db_is_named(data, tmp_path):
    from uniter_fast.data.vcr import write_vcr_txt_db
    from uniter_fast.tasks.vcr import _eval_dataset
    db = str(tmp_path / "vcr_empty.db")
    write_vcr_txt_db(db, {}, TxtTokLmdb(data["val"], -1).meta)
    with pytest.raises(ValueError, match=r"VCR text db .*vcr_empty.db holds no question"):
        _eval_dataset(db, "vcr_gt_x;vcr_det_x", _cfg())


def test_a_failing_validation_keeps_the_steps_checkpoint(data, tmp_path):
    """Validation runs after the step's checkpoint is saved: a val db that fails at its
    first read (a token id past the vocabulary) loses no step, the final one included."""
    from uniter_fast.tasks.base import default_config
    src = TxtTokLmdb(data["val"], -1)
    recs = {i: dict(src[i]) for i in src.id2len}
    bad = next(iter(recs))
    recs[bad]["input_ids"] = recs[bad]["input_ids"][:1] + [src.v_range[1]]
    val = str(tmp_path / "bad_val.db")
    write_txt_db(val, recs, src.meta)
    cfg = json.load(open(default_config("vqa")))
    train = ensure_task_dbs(vqa, make_spec(vqa, dict(num_train=40, num_val=2, per_item=2)),
                            WORLD, cache_dir=str(tmp_path / "cache"))
    cfg.update(checkpoint=None, train_txt_dbs=[train["train"]], train_img_dbs=[train["img"]],
               val_txt_db=val, val_img_db=data["img"], num_train_steps=2, valid_steps=2,
               save_steps=2, train_batch_size=128, output_dir=str(tmp_path / "run"))
    path = str(tmp_path / "vqa.json")
    json.dump(cfg, open(path, "w"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "uniter_fast", "finetune.py"),
                        "--task", "vqa", "--config", path, "--deepspeed_config",
                        os.path.join(ROOT, "ds.json"), "--precision", "fp32", "--no_progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "past the db's vocabulary" in p.stderr, p.stderr[-3000:]
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    assert (ckpt / "global_step2").is_dir()
    # the db repaired in place, --resume runs the validation the stop cut short
    import shutil
    shutil.rmtree(val)
    recs[bad]["input_ids"] = recs[bad]["input_ids"][:1]
    write_txt_db(val, recs, src.meta)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "uniter_fast", "finetune.py"),
                        "--task", "vqa", "--config", path, "--deepspeed_config",
                        os.path.join(ROOT, "ds.json"), "--precision", "fp32", "--no_progress",
                        "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs_out = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    vals = [r for r in recs_out if r.get("event") == "validation"]
    assert [r["step"] for r in vals] == [2] and "val/score" in vals[0]
    assert (tmp_path / "run" / "results" / "results_2_all.json").exists()


@pytest.mark.parametrize("test_split", [False, True])
def test_vcr_long_validation_text_fails_before_training(data, tmp_path, test_split):
    """VCR's rows are [CLS] q [SEP] a [SEP] r [SEP]: the longest one is found up front."""
    from uniter_fast.data.vcr import write_vcr_txt_db
    meta = TxtTokLmdb(data["val"], -1).meta
    limit = load_model_config(_cfg()).max_position_embeddings
    target = -1 if test_split else 1

    def rec(q, answers, rationales):
        return {"input_ids": [7] * q, "input_ids_as": [[7] * a for a in answers],
                "input_ids_rs": [[7] * r for r in rationales], "qa_target": target,
                "qar_target": target, "img_fname": ["vcr_gt_a.npz", "vcr_a.npz"]}
    # question 3, answers up to 9 (the right one, index 1, has 2), rationales up to 50
    recs = {"ok": rec(3, [4, 4, 4, 4], [5, 5, 5, 5]),
            "long": rec(3, [9, 2, 5, 5], [50, 6, 6, 6])}
    db = str(tmp_path / "vcr_val.db")
    write_vcr_txt_db(db, recs, meta)
    task = get_task("vcr")
    # test split: every answer with every rationale (9 + 50); val: the right answer's (2 + 50)
    want = 3 + (9 if test_split else 2) + 50 + 4
    assert task.longest_eval_text(db) == want
    cfg = _cfg(val_txt_db=db, val_img_db="vcr_gt_x;vcr_x")
    if want > limit:
        with pytest.raises(ValueError, match=rf"its longest text is {want} tokens"):
            task.check_eval_texts(load_model_config(cfg), cfg)
    else:
        task.check_eval_texts(load_model_config(cfg), cfg)
