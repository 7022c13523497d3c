"""The fine-tuning commands as a new user runs them (no argument but the output dir):
the tiny model, starting from the cached synthetic pretraining run (made by the first of
these tests), learns each synthetic task well above what a model ignoring the image can
reach.  VE runs through the deepspeed launcher, VQA and NLVR2 as plain scripts.

Baselines (computed on the very dbs used, :func:`uniter_fast.data.synthetic_tasks.baselines`):
``chance``, ``majority`` (the training split's most frequent answer) and ``text_only``
(the best answer for each exact text of the training split).
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT = os.path.join(ROOT, "uniter_fast", "finetune.py")
DS = os.path.join(ROOT, "ds.json")

pytestmark = pytest.mark.slow

#: task -> (validation metric, the value it must reach, margin over every baseline)
TARGETS = {"vqa": ("score", 0.7, 0.2), "ve": ("acc", 0.8, 0.2), "nlvr2": ("acc", 0.8, 0.2)}


@pytest.fixture(scope="module")
def env(training_env):
    return dict(training_env)     # conftest: the shared cache, no outer launcher's variables


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2"])
def test_default_command_learns_the_task(env, tmp_path, task):
    from uniter_fast.data.synthetic_tasks import nlvr2, ve, vqa

    def baselines(task, train_db, val_db):      # the task's generator's baselines
        return {"vqa": vqa, "ve": ve, "nlvr2": nlvr2}[task].baselines(train_db, val_db)
    out = str(tmp_path / "run")
    # fp32 on every CPU (conftest.default_pretrain_run): the targets are fp32 figures
    args = [FT, "--task", task, "--deepspeed_config", DS, "--output_dir", out,
            "--precision", "fp32"]
    if task == "ve":
        cmd = ["deepspeed", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    n = cfg["num_train_steps"]
    log = p.stdout + p.stderr
    assert f"{n}/{n}" in log, "tqdm progress bar"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    val = [r for r in recs if r.get("event") == "validation"][-1]
    end = [r for r in recs if r.get("event") == "end"][-1]
    metric, target, margin = TARGETS[task]
    got = val[f"val/{metric}"]
    base = baselines(task, cfg["train_txt_dbs"][0], cfg["val_txt_db"])
    report = (f"{task}: val/{metric} {got:.3f} after {n} steps ({end['train_wall_s']:.0f} s); "
              f"baselines {json.dumps({k: round(v, 3) for k, v in base.items()})}")
    print(report)
    assert got >= target, report
    assert got >= max(v for k, v in base.items() if "consistency" not in k) + margin, report
    if task == "nlvr2":
        assert val["val/consistency"] > base["text_only_consistency"] + margin, report
    # started from the cached synthetic pretraining run, not from random weights
    assert os.path.basename(cfg["checkpoint"]) == "uniter.pt"
    assert os.path.abspath(cfg["checkpoint"]).startswith(os.path.abspath(env["UNITER_FAST_CACHE"]))
    assert os.path.exists(os.path.join(out, "ckpt", "latest"))
