"""``--resume`` under a changed training config (issue 19 item 7): a change of what the
steps taken mean (batch size, learning rate) is refused with the keys listed, old and
new; ``--allow_config_change`` continues and keeps the old ``train_config.json`` /
``ds_config.json``, logging the change; extending a run (``num_train_steps``) is silent.

One 2-step run is shared by the module; each test works on a copy of it.
"""
import json
import os

import pytest
from faultutil import copy_run, latest, records, run, step_records, train_cmd

from uniter_fast.training.resume_config import (
    DS_RESUME_FREE_KEYS,
    RESUME_FREE_KEYS,
    check_resume_configs,
    config_changes,
)


@pytest.fixture(scope="module")
def base(env, config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume_cfg") / "run")
    run(train_cmd(config, out, steps=2, save=2), env)
    return out


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_changed_batch_and_learning_rate_refused(env, config, base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    cfg0 = _json(os.path.join(out, "train_config.json"))
    ds0 = _json(os.path.join(out, "ds_config.json"))
    metrics0 = open(os.path.join(out, "metrics.jsonl")).read()
    bs = int(cfg0["train_batch_size"])
    p = run(train_cmd(config, out, "--resume", "--train_batch_size", str(2 * bs),
                      "--learning_rate", "0.1", steps=4), env, ok=False)
    err = p.stderr
    assert f"train_batch_size {bs} -> {2 * bs}" in err, err[-3000:]
    assert f"learning_rate {json.dumps(cfg0['learning_rate'])} -> 0.1" in err
    assert "optimizer.params.lr" in err and "--allow_config_change" in err
    assert "num_train_steps" not in err.split("Free to change")[0], "a free key listed"
    # nothing of the run changed
    assert _json(os.path.join(out, "train_config.json")) == cfg0
    assert _json(os.path.join(out, "ds_config.json")) == ds0
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics0
    assert latest(out) == "global_step2"
    assert not [f for f in os.listdir(out) if ".step" in f]


def test_allow_config_change_keeps_the_old_config(env, config, base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    cfg0 = _json(os.path.join(out, "train_config.json"))
    ds0 = _json(os.path.join(out, "ds_config.json"))
    bs = int(cfg0["train_batch_size"])
    run(train_cmd(config, out, "--resume", "--train_batch_size", str(2 * bs),
                  "--learning_rate", "0.1", "--allow_config_change", steps=4), env)
    assert _json(os.path.join(out, "train_config.step2.json")) == cfg0
    assert _json(os.path.join(out, "ds_config.step2.json")) == ds0
    new = _json(os.path.join(out, "train_config.json"))
    assert new["train_batch_size"] == 2 * bs and new["learning_rate"] == 0.1
    assert _json(os.path.join(out, "ds_config.json"))["optimizer"]["params"]["lr"] == 0.1
    recs = records(os.path.join(out, "metrics.jsonl"))
    change = [r for r in recs if r.get("event") == "config_change"]
    assert len(change) == 1 and change[0]["step"] == 2
    assert change[0]["changes"]["train_config.json"]["train_batch_size"] == [bs, 2 * bs]
    assert change[0]["changes"]["train_config.json"]["learning_rate"] == [
        cfg0["learning_rate"], 0.1]
    assert change[0]["kept"] == {"train_config.json": "train_config.step2.json",
                                 "ds_config.json": "ds_config.step2.json"}
    assert sorted(r["step"] for r in step_records(out)) == [1, 2, 3, 4]

    # a second change from the same step keeps both earlier records: nothing is overwritten
    run(train_cmd(config, out, "--resume", "--resume_tag", "global_step2", "--learning_rate",
                  "0.2", "--allow_config_change", steps=3), env)
    assert _json(os.path.join(out, "train_config.step2.json")) == cfg0
    assert _json(os.path.join(out, "train_config.step2.2.json"))["learning_rate"] == 0.1
    assert _json(os.path.join(out, "train_config.json"))["learning_rate"] == 0.2


def test_extending_the_run_is_silent(env, config, base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    cfg0 = _json(os.path.join(out, "train_config.json"))
    p = run(train_cmd(config, out, "--resume", "--log_steps", "2", steps=4), env)
    assert "allow_config_change" not in p.stdout + p.stderr
    cfg = _json(os.path.join(out, "train_config.json"))
    assert cfg["num_train_steps"] == 4 and cfg["log_steps"] == 2
    assert {k: v for k, v in cfg.items() if k not in RESUME_FREE_KEYS} == \
        {k: v for k, v in cfg0.items() if k not in RESUME_FREE_KEYS}
    assert not [f for f in os.listdir(out) if ".step" in f]
    assert not [r for r in records(os.path.join(out, "metrics.jsonl"))
                if r.get("event") == "config_change"]


def test_config_changes_rules(tmp_path):
    old = {"num_train_steps": 8, "learning_rate": 5e-4, "train_batch_size": 1024,
           "output_dir": "a", "synthetic": {"seed": 0, "n": 3}}
    new = dict(old, num_train_steps=10, learning_rate=0.1, output_dir="b",
               synthetic={"seed": 1, "n": 3}, dropout=0.1)
    assert config_changes(old, new, RESUME_FREE_KEYS) == {
        "learning_rate": [5e-4, 0.1], "synthetic.seed": [0, 1], "dropout": ["(absent)", 0.1]}
    ds_old = {"optimizer": {"params": {"lr": 5e-4, "betas": [0.9, 0.98]}},
              "scheduler": {"params": {"total_num_steps": 8, "warmup_num_steps": 8,
                                       "warmup_max_lr": 5e-4}}}
    ds_new = {"optimizer": {"params": {"lr": 5e-4, "betas": (0.9, 0.98)}},
              "scheduler": {"params": {"total_num_steps": 10, "warmup_num_steps": 10,
                                       "warmup_max_lr": 5e-4}}}
    assert config_changes(ds_old, ds_new, DS_RESUME_FREE_KEYS) == {}
    # a run without recorded configs (export from-pt) is not compared
    assert check_resume_configs(str(tmp_path), {"train_config.json": new}, "global_step0") == {}
    # what the command line spells another way is the same setting: --precision adds an
    # fp16 section where the file had none, an absent stage / accumulation is 0 / 1
    with open(tmp_path / "ds_config.json", "w") as f:
        json.dump({"bf16": {"enabled": True}, "optimizer": {"params": {"lr": 1e-3}}}, f)
    same = {"bf16": {"enabled": True}, "fp16": {"enabled": False},
            "zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 1,
            "optimizer": {"params": {"lr": 1e-3}}}
    assert check_resume_configs(str(tmp_path), {"ds_config.json": same}, "global_step4") == {}
    with pytest.raises(ValueError, match=r"ds_config.json: optimizer.params.lr 0.001 -> 0.002"):
        check_resume_configs(str(tmp_path), {"ds_config.json": dict(
            same, optimizer={"params": {"lr": 2e-3}})}, "global_step4")
