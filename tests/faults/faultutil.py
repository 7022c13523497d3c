"""Helpers of the fault-injection tests: start training runs, read their records."""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "uniter_fast", "train.py")
DS = os.path.join(ROOT, "ds.json")


def train_cmd(config, out, *extra, steps=8, save=2):
    """train.py in bf16 on every CPU (a new run would train in fp32 where bf16 is emulated):
    these tests check the bf16 checkpoint layout and that export takes the fp32 masters;
    a later ``--precision`` in ``extra`` wins."""
    return [sys.executable, TRAIN, "--config", config, "--deepspeed_config", DS,
            "--num_train_steps", str(steps), "--save_steps", str(save), "--output_dir", out,
            "--no_progress", "--precision", "bf16", *extra]


def run(cmd, env, ok=True, timeout=300):
    """Run to completion; ``ok``: it must succeed (else it must fail).  Returns the process."""
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    if not ok and p.returncode == 0:
        raise AssertionError(f"{' '.join(cmd)} succeeded, expected a failure:\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(out):
    return [r for r in records(os.path.join(out, "metrics.jsonl")) if "event" not in r]


def latest(out):
    with open(os.path.join(out, "ckpt", "latest")) as f:
        return f.read().strip()


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def wait_for_step(out, step, proc, timeout=240):
    """Wait until the run logged ``step`` (or exited); True when it got there."""
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            try:
                if any(r.get("step", 0) >= step and "event" not in r for r in records(metrics)):
                    return True
            except ValueError:      # a line being written
                pass
        time.sleep(0.05)
    return False
