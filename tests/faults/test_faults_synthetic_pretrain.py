"""SIGTERM / SIGINT while fine-tuning makes its one-time synthetic pretraining run: the signal
reaches the child, nothing is left running or half-written in the cache, and the command
exits with the signal's status (issue #19: the child was orphaned and trained on)."""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from faultutil import DS, ROOT

FT = os.path.join(ROOT, "uniter_fast", "finetune.py")


def _children_training(proc):
    try:
        return [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "uniter_fast.train" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _world_data_done(cache):
    """The pretraining child's synthetic world is generated (it trains next)."""
    return any(re.fullmatch(r"synthetic-[0-9a-f]{12}", n) and
               os.path.exists(os.path.join(cache, n, "spec.json")) for n in os.listdir(cache))


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "training"), (signal.SIGINT, "training"),
                                      (signal.SIGTERM, "data")])
def test_stop_during_the_synthetic_pretraining_leaves_nothing(env, tmp_path, sig, when):
    cache = str(tmp_path / "cache")
    e = dict(env, UNITER_FAST_CACHE=cache)
    proc = subprocess.Popen([sys.executable, FT, "--task", "re", "--deepspeed_config", DS,
                             "--output_dir", str(tmp_path / "run"), "--precision", "fp32",
                             "--no_progress"], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        children, deadline = [], time.time() + 240
        while time.time() < deadline and proc.poll() is None and not children:
            children = _children_training(proc)
            time.sleep(0.5)
        assert children, "the pretraining child never started"
        child = children[0]
        if when == "training":               # its data made, it trains
            while time.time() < deadline and not _world_data_done(cache):
                time.sleep(0.5)
            assert _world_data_done(cache)
            time.sleep(4)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "stopped the synthetic pretraining run" in out
    # the child stopped too (it is no orphan training on) ...
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    # ... and nothing half-made is left in the cache (the next run starts it afresh)
    left = [n for n in os.listdir(cache) if "tmp" in n or n.startswith("pretrain-")]
    assert left == [], left
