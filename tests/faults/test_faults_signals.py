"""Fault injection: SIGINT / SIGTERM to real training processes (issue 13 item 8), and
resuming a 2-rank checkpoint with 1 process (item 9, world size)."""
import json
import os
import random
import re
import signal
import subprocess
import sys

import psutil
from faultutil import ROOT, latest, records, run, step_records, train_cmd, wait_for_step

from uniter_fast import checkpoint as ckpt_lib
from uniter_fast.training.signals import REPEAT_GRACE_S, StopRequest


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_stop_request_first_sets_flag_repeat_within_grace_ignored_second_exits():
    clock, exits, msgs = _Clock(), [], []

    class _S:
        def write(self, m):
            msgs.append(m)

        def flush(self):
            pass
    stop = StopRequest(exit_fn=exits.append, clock=clock, stream=_S())
    stop.handler(signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and not exits
    assert "finishing the current step" in msgs[0] and "143" in msgs[0]
    clock.t += REPEAT_GRACE_S / 2               # a launcher forwarding the same stop
    stop.handler(signal.SIGINT)
    assert not exits and stop.signum == signal.SIGTERM
    clock.t += REPEAT_GRACE_S                   # the user insists
    stop.handler(signal.SIGINT)
    assert exits == [128 + signal.SIGINT] and "at once" in msgs[-1]


def test_stop_request_install_restore():
    stop = StopRequest(exit_fn=lambda c: None)
    old = signal.getsignal(signal.SIGTERM)
    assert stop.install()
    try:
        assert signal.getsignal(signal.SIGTERM) == stop.handler
        os.kill(os.getpid(), signal.SIGTERM)      # delivered to the handler, not fatal
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == old


def test_stop_request_is_ignored_in_a_forked_child():
    """A process forked from the trainer (a DataLoader worker, before its
    worker_init_fn) inherits the handler: there it does nothing, in the trainer
    it still sets the flag."""
    msgs = []

    class _S:
        def write(self, m):
            msgs.append(m)

        def flush(self):
            pass
    stop = StopRequest(exit_fn=lambda c: None, stream=_S())
    assert stop.install()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:    # the child: only os calls, then _exit
            try:
                os.close(r)
                os.kill(os.getpid(), signal.SIGINT)
                os.write(w, b"ignored" if stop.signum is None and not msgs else b"handled")
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            got = f.read()
        os.waitpid(pid, 0)
        assert got == b"ignored"
        assert stop.signum is None and not msgs
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and "SIGINT received" in msgs[0]
    finally:
        stop.restore()


def _interrupt(proc, out, at_step, sig, target_pid=None):
    reached = wait_for_step(out, at_step, proc)
    if proc.poll() is None:
        os.kill(target_pid or proc.pid, sig)
    try:
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert reached, "the run ended before the step at which it was to be interrupted"


def test_sigterm_saves_at_the_current_step_and_resumes(env, config, tmp_path):
    out = str(tmp_path / "term")
    proc = subprocess.Popen(train_cmd(config, out, steps=200, save=1000), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _interrupt(proc, out, random.Random().randrange(2, 5), signal.SIGTERM)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received: finishing the current step" in stderr
    recs = records(os.path.join(out, "metrics.jsonl"))
    intr = [r for r in recs if r.get("event") == "interrupted"]
    assert len(intr) == 1 and intr[0]["signal"] == "SIGTERM"
    k = intr[0]["step"]
    assert max(r["step"] for r in step_records(out)) == k, "stopped after the current step"
    assert latest(out) == f"global_step{k}"          # saved at that step (save_steps is 1000)
    assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", f"global_step{k}")) == []
    run(train_cmd(config, out, "--resume", steps=k + 2, save=1000), env)
    starts = [r for r in records(os.path.join(out, "metrics.jsonl")) if r.get("event") == "start"]
    assert starts[-1]["step"] == k and starts[-1]["resumed"]
    assert [r["step"] for r in step_records(out)] == list(range(1, k + 3))


def test_ctrl_c_to_the_process_group_with_dataloader_workers(env, config, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, DataLoader workers
    included: the workers ignore it, the main process announces the stop once,
    saves at the current step and exits 130."""
    with open(config) as f:
        cfg = json.load(f)
    cfg["n_workers"] = 2
    workers_cfg = str(tmp_path / "workers.json")
    with open(workers_cfg, "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "ctrl_c")
    proc = subprocess.Popen(train_cmd(workers_cfg, out, steps=200, save=1000), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert wait_for_step(out, 2, proc)
    n_children = len(psutil.Process(proc.pid).children(recursive=True))
    os.killpg(proc.pid, signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert n_children >= 2, "no DataLoader worker processes were running"
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.count("SIGINT received") == 1, stderr[-3000:]
    intr = [r for r in records(os.path.join(out, "metrics.jsonl"))
            if r.get("event") == "interrupted"]
    assert len(intr) == 1 and latest(out) == f"global_step{intr[0]['step']}"
    assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", latest(out))) == []


def test_sigint_to_one_of_two_ranks_saves_on_both(env, config, tmp_path):
    """Ctrl-C reaching only rank 1: the ranks agree (all-reduced flag), both save the
    same step, both exit 130; then resuming with 1 process is refused up front."""
    out = str(tmp_path / "r2")
    port = str(29500 + random.randrange(1000, 9000))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", port] + train_cmd(config, out, steps=200, save=1000)[1:]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert wait_for_step(out, 2, proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "train.py" in " ".join(c.cmdline())]
    rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
    assert len(workers) == 2 and len(rank1) == 1
    _interrupt(proc, out, 2, signal.SIGINT, target_pid=rank1[0].pid)
    log = proc.communicate()[0]
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*130", log), log[-3000:]     # torchrun's failure report
    intr = [r for r in records(os.path.join(out, "metrics.jsonl"))
            if r.get("event") == "interrupted"]
    assert len(intr) == 1 and intr[0]["signal"] == "SIGINT"
    k = intr[0]["step"]
    tag = f"global_step{k}"
    assert latest(out) == tag
    man = ckpt_lib.read_manifest(os.path.join(out, "ckpt", tag))
    assert man["settings"]["world_size"] == 2
    assert {"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(man["files"])
    assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", tag)) == []
    # item 9: another world size is refused up front, naming both
    p = run(train_cmd(config, out, "--resume", steps=k + 2, save=1000), env, ok=False)
    assert "world_size=2; this run has zero_stage=2, precision=bf16, world_size=1" in p.stderr
    assert "on 2 processes" in p.stderr
