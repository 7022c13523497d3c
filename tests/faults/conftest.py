"""Shared, session-scoped set-up of the fault-injection tests: one synthetic-data cache
and one small training config for every training run they start."""
import json
import os

import pytest
from faultutil import ROOT


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["UNITER_FAST_CACHE"] = str(tmp_path_factory.mktemp("uf_fault_cache"))
    e["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="session")
def config(tmp_path_factory):
    """The packaged synthetic config, smaller: few images, no validation, every
    checkpoint kept, a record per step."""
    with open(os.path.join(ROOT, "uniter_fast", "configs", "pretrain-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    cfg["synthetic"] = dict(cfg.get("synthetic") or {}, num_train_images=300,
                            num_val_images=40)
    cfg.update(val_datasets=[], keep_checkpoints=100, log_steps=1, valid_steps=100000)
    path = str(tmp_path_factory.mktemp("uf_fault_cfg") / "faults.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path
