"""``--compile`` in the commands (slow: each runs the command line): train.py compiled gives
the eager run's losses and validation; finetune.py compiled validates like the eager
inference of its checkpoint, and ``infer --compile`` writes the eager inference's answers.
Compiled with ``--compile_backend aot_eager`` (dynamo and AOT autograd, the same graphs
without inductor's code generation: CI time); tests/test_compile.py runs inductor."""
import json
import os
import sys

import pytest
from test_train import _run as run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "uniter_fast", "train.py")
FT = os.path.join(ROOT, "uniter_fast", "finetune.py")
DS = os.path.join(ROOT, "ds.json")
CONFIGS = os.path.join(ROOT, "uniter_fast", "configs")
COMPILE = ["--compile", "--compile_backend", "aot_eager"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(training_env):
    return dict(training_env)     # conftest: the shared cache, no outer launcher's variables


def _run(cmd, env):
    return run_command(cmd, env, timeout=600)      # compiling: longer than test_train's default


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _event(out, name):
    return [r for r in _records(out) if r.get("event") == name]


def test_train_compiled_gives_the_eager_losses(env, tmp_path):
    runs = {}
    for name, extra in (("eager", ["--no-compile"]), ("compiled", COMPILE)):
        out = str(tmp_path / name)
        _run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps", "3",
              "--log_steps", "1", "--output_dir", out, "--precision", "fp32", "--no_progress",
              *extra], env)
        runs[name] = out
    assert _event(runs["eager"], "start")[0]["compile"] is False
    assert _event(runs["compiled"], "start")[0]["compile"] is True
    steps = {n: [r for r in _records(o) if "event" not in r] for n, o in runs.items()}
    assert [r["task"] for r in steps["compiled"]] == [r["task"] for r in steps["eager"]]
    for a, b in zip(steps["compiled"], steps["eager"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
    val = {n: _event(o, "validation")[-1] for n, o in runs.items()}
    for k, v in val["eager"].items():
        if isinstance(v, float):
            assert val["compiled"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    end = _event(runs["compiled"], "end")[0]
    assert end["compile"]["graph_breaks"] == 0
    # one compilation per task and mode (4 tasks: training, then validation)
    assert 1 <= end["compile"]["compilations"] <= 8, end["compile"]


def test_finetune_and_infer_compiled(env, tmp_path):
    with open(os.path.join(CONFIGS, "finetune-vqa-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    out = str(tmp_path / "run")
    cfg["checkpoint"] = None
    cfg["synthetic_task"] = dict(cfg["synthetic_task"], num_train=120, num_val=40, per_item=2)
    cfg.update(output_dir=out, log_steps=1, train_batch_size=512, warmup_steps=2,
               num_train_steps=3, save_steps=3, valid_steps=3)
    path = str(tmp_path / "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    _run([sys.executable, FT, "--task", "vqa", "--config", path, "--deepspeed_config", DS,
          "--precision", "fp32", "--no_progress", *COMPILE], env)
    assert _event(out, "start")[0]["compile"] is True
    end = _event(out, "end")[0]
    assert end["compile"]["graph_breaks"] == 0 and end["compile"]["compilations"] <= 4
    with open(os.path.join(out, "train_config.json")) as f:
        run_cfg = json.load(f)
    answers = {}
    for name, extra in (("eager", []), ("compiled", COMPILE)):
        res = str(tmp_path / f"infer_{name}.json")
        p = _run([sys.executable, "-m", "uniter_fast.infer", "--task", "vqa", "--checkpoint",
                  out, "--txt_db", run_cfg["val_txt_db"], "--img_db", run_cfg["val_img_db"],
                  "--output", res, "--no_progress", *extra], env)
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        if extra:
            assert summary["compile"]["compilations"] >= 1, summary
            assert summary["compile"]["graph_breaks"] == 0, summary
        with open(res) as f:
            answers[name] = ({r["question_id"]: r["answer"] for r in json.load(f)},
                             summary["score"])
    assert answers["compiled"] == answers["eager"]
    # the compiled validation of the run (same weights) scored what eager inference scores
    assert _event(out, "validation")[-1]["val/score"] == pytest.approx(answers["eager"][1],
                                                                       abs=1e-6)
