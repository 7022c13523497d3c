"""The ablation script (python -m uniter_fast.ablation) without training: each setting's
training config differs from the default run in exactly its ablated key, finished runs
are reused, an unfinished one is refused, and the tables are the mean / standard
deviation of the per-seed values at the right validation step."""
import json
import os
import statistics
import subprocess

import pytest

from uniter_fast import ablation
from uniter_fast.training.config import read_json
from uniter_fast.training.pretrain import DEFAULT_CONFIG

KEYS = sorted({key for _, _, cols in ablation.TABLES for key, _, _ in cols})


def _fake_train(calls, value_of):
    """A stand-in for subprocess.run of train.py: records the config, writes two
    validations (steps 1000, 2000) and an end record with values from ``value_of``."""
    def run(cmd, **kw):
        cfg = read_json(cmd[cmd.index("--config") + 1], "config")
        calls.append((cmd, cfg))
        os.makedirs(cfg["output_dir"])
        with open(os.path.join(cfg["output_dir"], "metrics.jsonl"), "w") as f:
            for step in (1000, 2000):
                rec = {"event": "validation", "step": step}
                rec.update({k: value_of(cfg, k, step) for k in KEYS})
                f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"event": "end", "step": 2000}) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def _value(cfg, key, step):
    # distinct per setting, seed, metric and step, so a mixed-up cell shows
    s = {"conditional": 0.0, "joint": 0.1, "no_wra": 0.2}[_setting(cfg)]
    return round(0.5 + s + 0.01 * cfg["seed"] + 0.001 * KEYS.index(key) + step / 1e5, 6)


def _setting(cfg):
    if cfg.get("masking") == "joint":
        return "joint"
    return "no_wra" if cfg["itm_ot_lambda"] == 0 else "conditional"


def test_settings_tables_and_reuse(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation.subprocess, "run", _fake_train(calls, _value))
    out = str(tmp_path / "abl")
    rec = ablation.main(["--seeds", "3", "5", "--out", out, "--jobs", "1",
                         "--precision", "fp32"])
    default = read_json(DEFAULT_CONFIG, "default config")
    assert len(calls) == 6
    for cmd, cfg in calls:
        assert cmd[cmd.index("--precision") + 1] == "fp32"
        diff = {k for k in set(cfg) | set(default)
                if cfg.get(k) != default.get(k)} - {"seed", "output_dir"}
        name = _setting(cfg)
        assert diff == set(ablation.SETTINGS[name][1]), (name, diff)
        assert cfg["itm_ot_lambda"] == (0.0 if name == "no_wra" else default["itm_ot_lambda"])
    assert sorted((_setting(c), c["seed"]) for _, c in calls) == sorted(
        (s, seed) for s in ablation.SETTINGS for seed in (3, 5))

    # the markdown: "prev" columns at step 1000, the others at 2000, mean ± sd (values)
    md = open(os.path.join(out, "ablation.md")).read()
    key = "mlm_synthetic/obj_acc"
    for setting, label in (("conditional", "(a) conditional"), ("joint", "(b) joint")):
        row = [ln for ln in md.splitlines() if ln.startswith(f"| {label} |")][0]
        for step, cell in ((1000, 1), (2000, 2)):
            vals = [_value({"seed": s, "itm_ot_lambda": 0.0 if setting == "no_wra" else 0.1,
                            "masking": "joint" if setting == "joint" else None}, key, step)
                    for s in (3, 5)]
            want = f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"
            assert row.split(" | ")[cell].startswith(want), (row, want)
    assert "MLM object-word acc, step 1000" in md       # the mid-run column is labelled
    assert json.load(open(os.path.join(out, "ablation.json")))["results"] == rec["results"]

    # finished runs are reused, nothing retrains
    calls.clear()
    ablation.main(["--seeds", "3", "5", "--out", out, "--jobs", "1", "--precision", "fp32"])
    assert calls == []


def test_unfinished_run_is_refused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation.subprocess, "run", _fake_train(calls, _value))
    out = tmp_path / "abl"
    (out / "joint-seed0").mkdir(parents=True)
    (out / "joint-seed0" / "metrics.jsonl").write_text(
        json.dumps({"event": "validation", "step": 5}) + "\n")      # no end record
    with pytest.raises(ValueError, match="unfinished run"):
        ablation.main(["--seeds", "0", "--out", str(out), "--jobs", "1",
                       "--settings", "joint", "--precision", "fp32"])
    assert calls == []
