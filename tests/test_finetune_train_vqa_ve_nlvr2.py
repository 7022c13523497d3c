"""Fine-tuning end to end on CPU (small synthetic dbs, random initial weights so no
pretraining run is needed): a killed run resumed with ``--resume`` retraces an
uninterrupted one; every task's validation metric, result files, inference command
and export (to a plain state dict with the original's keys and back); two ranks under
the deepspeed launcher (results gathered over ranks)."""
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from oracle_vqa_ve_nlvr2 import layout as oracle_layout
from record_compare import assert_records_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT = os.path.join(ROOT, "uniter_fast", "finetune.py")
DS = os.path.join(ROOT, "ds.json")
#: fp32 on every CPU: the one shared synthetic pretraining run (conftest) is fp32
FP32 = ["--precision", "fp32"]
CONFIGS = os.path.join(ROOT, "uniter_fast", "configs")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(training_env):
    return dict(training_env)     # conftest: the shared cache, no outer launcher's variables


def _run(cmd, env, timeout=300):
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _steps(out):
    return {r["step"]: r for r in _records(os.path.join(out, "metrics.jsonl"))
            if "event" not in r}


def _validations(out):
    return [r for r in _records(os.path.join(out, "metrics.jsonl"))
            if r.get("event") == "validation"]


SMALL = {"vqa": {"num_train": 120, "num_val": 40, "per_item": 2},
         "ve": {"num_train": 120, "num_val": 40, "per_item": 2},
         "nlvr2": {"num_train": 30, "num_val": 10, "per_item": 4}}


def _config(task, tmp_path, name="cfg", **kw):
    """The shipped synthetic config with small dbs and random initial weights."""
    with open(os.path.join(CONFIGS, f"finetune-{task}-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    cfg["checkpoint"] = None
    cfg["synthetic_task"] = dict(cfg["synthetic_task"], **SMALL[task])
    cfg.update(output_dir=str(tmp_path / name), log_steps=1, train_batch_size=512,
               warmup_steps=2)
    cfg.update(kw)
    path = str(tmp_path / f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path, cfg


def test_kill_and_resume_retraces_an_uninterrupted_run(env, tmp_path):
    n = 24
    path, _ = _config("vqa", tmp_path, "base", num_train_steps=n, save_steps=2, valid_steps=12)
    common = [FT, "--task", "vqa", "--config", path, "--deepspeed_config", DS, "--no_progress",
              *FP32]
    ref = str(tmp_path / "ref")
    _run([sys.executable, *common, "--output_dir", ref], env)
    ref_steps = _steps(ref)

    out = str(tmp_path / "killed")
    rng = random.Random(int(time.time()))
    kill_at = rng.randrange(4, 20)
    proc = subprocess.Popen([sys.executable, *common, "--output_dir", out], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and any(r.get("step", 0) >= kill_at and "event" not in r
                                               for r in _records(metrics)):
                break
            time.sleep(0.05)
        time.sleep(rng.random() * 0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0, "the run was killed before finishing"
    with open(os.path.join(out, "ckpt", "latest")) as f:
        ck_step = int(f.read().strip().replace("global_step", ""))
    assert 2 <= ck_step < n

    _run([sys.executable, *common, "--output_dir", out, "--resume"], env)
    steps = _steps(out)
    assert sorted(steps) == list(range(1, n + 1))
    for s in range(ck_step + 1, n + 1):
        assert steps[s]["loss"] == pytest.approx(ref_steps[s]["loss"], rel=1e-6, abs=1e-7), s
        assert steps[s]["lr"] == pytest.approx(ref_steps[s]["lr"], rel=1e-9)
    # a record mixes numbers with strings ("event"): approx only the numbers (pytest >= 9.2
    # rejects approx over a dict holding a str under rel=)
    assert_records_close(_validations(out)[-1], _validations(ref)[-1], rel=1e-6)
    for f in ("results_12_all.json", "results_24_all.json"):
        with open(os.path.join(ref, "results", f)) as a, open(os.path.join(out, "results", f)) as b:
            assert json.load(a) == json.load(b)


def _read_results(task, path):
    if task == "nlvr2":
        with open(path) as f:
            rows = list(csv.reader(f))
        assert all(len(r) == 2 and r[1] in ("True", "False") for r in rows), rows[:3]
        return {r[0]: r[1] for r in rows}
    with open(path) as f:
        res = json.load(f)
    if task == "vqa" and isinstance(res, list):      # the evaluation server's format
        assert all(set(r) == {"answer", "question_id"} and isinstance(r["question_id"], int)
                   for r in res)
        return {str(r["question_id"]): r["answer"] for r in res}
    return res


def _val_ids(txt_db):
    with open(os.path.join(txt_db, "id2len.json")) as f:
        return set(json.load(f))


@pytest.mark.parametrize("task,model", [("vqa", None), ("ve", None), ("nlvr2", "paired-attn"),
                                        ("nlvr2", "triplet")])
def test_metrics_results_inference_and_export(env, tmp_path, task, model):
    from uniter_fast import UniterConfig, config_path
    from uniter_fast.data.vqa import load_ans2label
    from uniter_fast.model.ve import VE_ENT2IDX
    extra = {"model": model} if model else {}
    path, _ = _config(task, tmp_path, num_train_steps=6, save_steps=6, valid_steps=3, **extra)
    out = str(tmp_path / "cfg")
    p = _run([sys.executable, FT, "--task", task, "--config", path, "--deepspeed_config", DS,
              "--debug_rank_files", *FP32], env)
    log = p.stdout + p.stderr
    assert f"{task}" in log and "6/6" in log, "tqdm bar"
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    metric = {"vqa": "score", "ve": "acc", "nlvr2": "acc"}[task]
    vals = _validations(out)
    assert [v["step"] for v in vals] == [3, 6]
    for v in vals:
        assert 0.0 <= v[f"val/{metric}"] <= 1.0 and v["val/loss"] > 0
        if task == "nlvr2":
            assert 0.0 <= v["val/consistency"] <= v["val/acc"] + 1e-9
    # per-validation result files, all validation examples, the original's formats
    name = {"vqa": "results_{s}_all.json", "ve": "val_results_{s}_all.json",
            "nlvr2": "val_results_{s}_all.csv"}[task]
    val_res = _read_results(task, os.path.join(out, "results", name.format(s=6)))
    ids = _val_ids(cfg["val_txt_db"])
    assert set(val_res) == ids
    if task == "vqa":
        a2l = load_ans2label(os.path.join(out, "ckpt", "ans2label.json"))
        assert a2l == load_ans2label() and set(val_res.values()) <= set(a2l)
    elif task == "ve":
        assert set(val_res.values()) <= set(VE_ENT2IDX)

    # inference from the DeepSpeed checkpoint: same predictions and metric as the
    # run's last validation (same weights)
    ext = "csv" if task == "nlvr2" else "json"
    res1 = str(tmp_path / f"infer.{ext}")
    p = _run([sys.executable, "-m", "uniter_fast.infer", "--task", task, "--checkpoint", out,
              "--txt_db", cfg["val_txt_db"], "--img_db", cfg["val_img_db"], "--output", res1],
             env)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["n"] == len(ids)
    # fp32 training (CPUs without native bf16): the very same numbers; bf16 training
    # validates with the bf16 module while inference uses the fp32 masters
    start = [r for r in _records(os.path.join(out, "metrics.jsonl"))
             if r.get("event") == "start"][0]
    fp32 = start["dtype"] == "torch.float32"
    tol = 1e-6 if fp32 else 0.05
    assert summary[metric] == pytest.approx(vals[-1][f"val/{metric}"], abs=tol)
    if task == "nlvr2":
        assert summary["consistency"] == pytest.approx(vals[-1]["val/consistency"], abs=tol)
    got = _read_results(task, res1)
    assert set(got) == set(val_res)
    agree = sum(got[k] == val_res[k] for k in got) / len(got)
    assert agree == 1.0 if fp32 else agree >= 0.9
    if task == "vqa":
        with open(res1) as f:
            assert isinstance(json.load(f), list)

    # export: exactly the original class's keys and shapes, the trained fp32 weights
    pt = str(tmp_path / "model.pt")
    _run([sys.executable, "-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"), pt,
          "--task", task], env)
    sd = torch.load(pt)
    ucfg = UniterConfig(config_path("uniter-tiny"))
    kind = model or task
    want = oracle_layout(kind, ucfg, 2048, num_answer=3129 if task == "vqa" else None)
    assert sorted((k, tuple(v.shape)) for k, v in sd.items()) == sorted(want)
    assert all(v.dtype == torch.float32 for v in sd.values())
    final = torch.load(os.path.join(out, "final_weights_rank0.pt"))
    assert set(final) == set(sd)
    for k in sd:
        torch.testing.assert_close(sd[k], final[k].float(), atol=1e-2, rtol=1e-2)
    if task != "vqa":        # the rest is task-independent: once is enough
        return
    # inference from the plain state dict (the run's config): the same result file
    res2 = str(tmp_path / f"infer_pt.{ext}")
    _run([sys.executable, "-m", "uniter_fast.infer", "--task", task, "--checkpoint", pt,
          "--config", os.path.join(out, "train_config.json"), "--txt_db", cfg["val_txt_db"],
          "--img_db", cfg["val_img_db"], "--output", res2, "--no_progress"], env)
    assert _read_results(task, res2) == got
    # the wrong task is refused, naming the mismatch
    bad = subprocess.run([sys.executable, "-m", "uniter_fast.export", "to-pt",
                          os.path.join(out, "ckpt"), str(tmp_path / "bad.pt"), "--task",
                          "ve"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "do not fit" in bad.stderr


def test_export_from_pt_round_trip_and_resume(env, tmp_path):
    path, cfg = _config("vqa", tmp_path, num_train_steps=4, save_steps=4, valid_steps=4)
    out = cfg["output_dir"]
    _run([sys.executable, FT, "--task", "vqa", "--config", path, "--deepspeed_config", DS,
          "--no_progress", *FP32], env)
    pt = str(tmp_path / "a.pt")
    _run([sys.executable, "-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"), pt,
          "--task", "vqa"], env)
    new = tmp_path / "new"
    with open(DS) as f:       # an fp32 checkpoint on every CPU (so is its resume below)
        ds32 = dict(json.load(f), bf16={"enabled": False})
    ds32_path = str(tmp_path / "ds_fp32.json")
    with open(ds32_path, "w") as f:
        json.dump(ds32, f)
    _run([sys.executable, "-m", "uniter_fast.export", "from-pt", pt, str(new / "ckpt"),
          "--task", "vqa", "--config", path, "--deepspeed_config", ds32_path], env)
    assert os.path.exists(new / "ckpt" / "ans2label.json")
    back = str(tmp_path / "b.pt")
    _run([sys.executable, "-m", "uniter_fast.export", "to-pt", str(new / "ckpt"), back,
          "--task", "vqa"], env)
    a, b = torch.load(pt), torch.load(back)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-2, rtol=1e-2)
    # fine-tuning continues from the converted checkpoint
    _run([sys.executable, FT, "--task", "vqa", "--config", path, "--deepspeed_config", DS,
          "--output_dir", str(new), "--resume", "--no_progress", "--num_train_steps", "6"], env)
    assert sorted(_steps(str(new))) == [1, 2, 3, 4, 5, 6]
    # a state dict of another model is refused, naming the keys
    sd = dict(a)
    sd.pop("vqa_output.3.bias")
    torch.save(sd, str(tmp_path / "c.pt"))
    p = subprocess.run([sys.executable, "-m", "uniter_fast.export", "from-pt",
                        str(tmp_path / "c.pt"), str(tmp_path / "n2" / "ckpt"), "--task", "vqa",
                        "--config", path, "--deepspeed_config", DS], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "vqa_output.3.bias" in p.stderr


def test_two_ranks_gather_results(env, tmp_path):
    """NLVR2 on 2 CPU ranks (deepspeed launcher): each rank validates its shard; the
    result file and the metrics cover the whole split and equal single-process inference
    on the final checkpoint."""
    path, cfg = _config("nlvr2", tmp_path, num_train_steps=4, save_steps=4, valid_steps=4)
    out = cfg["output_dir"]
    with socket.socket() as sk:      # not the default 29500: other jobs may hold it
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    _run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), FT, "--task", "nlvr2",
          "--config", path,
          "--deepspeed_config", DS, "--no_progress", *FP32], env, timeout=400)
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    start = [r for r in _records(os.path.join(out, "metrics.jsonl")) if r.get("event") == "start"]
    assert start[0]["world_size"] == 2
    val = _validations(out)[-1]
    res = _read_results("nlvr2", os.path.join(out, "results", "val_results_4_all.csv"))
    assert set(res) == _val_ids(cfg["val_txt_db"])
    p = _run([sys.executable, "-m", "uniter_fast.infer", "--task", "nlvr2", "--checkpoint", out,
              "--txt_db", cfg["val_txt_db"], "--img_db", cfg["val_img_db"], "--output",
              str(tmp_path / "r.csv"), "--no_progress"], env)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["acc"] == pytest.approx(val["val/acc"], abs=1e-6)
    assert summary["consistency"] == pytest.approx(val["val/consistency"], abs=1e-6)
    assert _read_results("nlvr2", str(tmp_path / "r.csv")) == res
