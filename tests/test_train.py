"""DeepSpeed pretraining end to end (CPU): the main command, 2 ranks under ZeRO-2/3,
ZeRO stages 0/1/3 with tied weights, kill + resume, export to a plain state dict,
fp16 overflow skipping (where DeepSpeed supports fp16); convergence: tests/test_convergence.py."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "uniter_fast", "train.py")
DS = os.path.join(ROOT, "ds.json")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["UNITER_FAST_CACHE"] = str(tmp_path_factory.mktemp("uf_cache"))
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def _run(cmd, env, timeout=240, **kw):
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _steps(out):
    """Last record of each training step (a resumed run re-logs steps after its checkpoint)."""
    by = {}
    for r in _records(os.path.join(out, "metrics.jsonl")):
        if "event" not in r:
            by[r["step"]] = r
    return by


def test_main_command_deepspeed_launcher(env, tmp_path):
    out = str(tmp_path / "run")
    p = _run(["deepspeed", TRAIN, "--deepspeed_config", DS, "--num_train_steps", "12",
              "--output_dir", out, "--log_steps", "1", "--save_steps", "6"], env)
    log = p.stdout + p.stderr
    assert "pretrain" in log and "12/12" in log, "tqdm progress bar"
    steps = _steps(out)
    seen = {r["task"].split("_")[0] for r in steps.values()}
    assert len(seen) >= 2 and all(f"{t}=" in log for t in seen), "per-task losses on the bar"
    assert sorted(steps) == list(range(1, 13))
    for r in steps.values():
        assert r["task"].split("_")[0] in ("itm", "mlm", "mrfr", "mrckl")
        assert r["loss"] == r["loss"] and r["lr"] >= 0 and r["tokens_per_s"] > 0
    val = [r for r in _records(os.path.join(out, "metrics.jsonl"))
           if r.get("event") == "validation"]
    assert val and "itm_synthetic/acc" in val[-1] and "mlm_synthetic/loss" in val[-1]
    with open(os.path.join(out, "ckpt", "latest")) as f:
        assert f.read().strip() == "global_step12"
    assert os.path.isdir(os.path.join(out, "ckpt", "global_step6"))
    start = [r for r in _records(os.path.join(out, "metrics.jsonl")) if r.get("event") == "start"]
    # ds.json's bf16, or fp32 (and a line saying so) where bf16 would be emulated
    from uniter_fast.training.config import bf16_emulated, read_json
    emulated = bf16_emulated(read_json(DS, "DeepSpeed config"))
    assert start[0]["dtype"] == ("torch.float32" if emulated else "torch.bfloat16"), start
    assert start[0]["zero_stage"] == 2
    assert start[0]["cpu_allocator"] == "kept"     # training/allocator.py, on CPU by default
    assert ("no native bf16" in log and "training in fp32" in log) == emulated


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_disjoint_data_identical_weights(env, tmp_path, stage):
    out = str(tmp_path / "r2")
    port = str(29500 + random.randrange(1000, 9000))
    args = [TRAIN, "--deepspeed_config", DS, "--num_train_steps", "8", "--output_dir", out,
            "--no_progress", "--debug_rank_files", "--zero_stage", str(stage),
            "--valid_steps", "4"]
    if stage == 2:   # DeepSpeed's launcher starts 2 CPU ranks too
        _run(["deepspeed", "--num_gpus", "2", "--master_port", port, *args], env)
    else:
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", port, *args], env)
    r0 = _records(os.path.join(out, "metrics_rank0.jsonl"))
    r1 = _records(os.path.join(out, "metrics_rank1.jsonl"))
    assert len(r0) == len(r1) == 8
    assert [r["task"] for r in r0] == [r["task"] for r in r1], "same task on every rank"
    assert all(a["data_fp"] != b["data_fp"] for a, b in zip(r0, r1)), "ranks see different data"
    w0 = torch.load(os.path.join(out, "final_weights_rank0.pt"))
    w1 = torch.load(os.path.join(out, "final_weights_rank1.pt"))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "replicas identical after the steps"


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_tied_weights_and_export(env, tmp_path, stage):
    from uniter_fast import UniterConfig, UniterForPretraining, config_path
    out = str(tmp_path / f"z{stage}")
    _run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps", "5",
          "--output_dir", out, "--no_progress", "--debug_rank_files", "--zero_stage",
          str(stage), "--valid_steps", "5"], env)
    final = torch.load(os.path.join(out, "final_weights_rank0.pt"))
    pt = str(tmp_path / "model.pt")
    _run([sys.executable, "-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"), pt], env)
    sd = torch.load(pt)
    model = UniterForPretraining(UniterConfig(config_path("uniter-tiny")), 2048, 11)
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    # tied weights stay tied (also under ZeRO-3) and were trained
    for a, b in (("cls.predictions.decoder.weight", "uniter.embeddings.word_embeddings.weight"),
                 ("feat_regress.weight", "uniter.img_embeddings.img_linear.weight")):
        assert torch.equal(sd[a], sd[b]) and torch.equal(final[a], final[b])
    torch.manual_seed(42)     # train.py's seed: the initial weights
    init = UniterForPretraining(UniterConfig(config_path("uniter-tiny")), 2048, 11).state_dict()
    assert not torch.equal(sd["uniter.embeddings.word_embeddings.weight"],
                           init["uniter.embeddings.word_embeddings.weight"])
    # the export is the fp32 master copy: equal to the bf16 module weights up to bf16 rounding
    for k in final:
        torch.testing.assert_close(sd[k].to(torch.bfloat16).float(), final[k], atol=1e-2, rtol=1e-2)


def test_kill_and_resume_continues(env, tmp_path):
    n = 30
    common = ["--deepspeed_config", DS, "--num_train_steps", str(n), "--save_steps", "2",
              "--valid_steps", "1000", "--log_steps", "1", "--no_progress"]
    ref = str(tmp_path / "ref")
    _run([sys.executable, TRAIN, *common, "--output_dir", ref], env)
    ref_steps = _steps(ref)

    out = str(tmp_path / "killed")
    rng = random.Random(int(time.time()))
    kill_at = rng.randrange(5, 24)
    proc = subprocess.Popen([sys.executable, TRAIN, *common, "--output_dir", out], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if os.path.exists(metrics) and any(r.get("step", 0) >= kill_at and "event" not in r
                                               for r in _records(metrics)):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(rng.random() * 0.3)       # land anywhere, also inside a save
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0, "the run was killed before finishing"
    with open(os.path.join(out, "ckpt", "latest")) as f:
        tag = f.read().strip()
    ck_step = int(tag.replace("global_step", ""))
    assert 2 <= ck_step < n

    _run([sys.executable, TRAIN, *common, "--output_dir", out, "--resume"], env)
    starts = [r for r in _records(metrics) if r.get("event") == "start"]
    assert starts[-1]["step"] == ck_step and starts[-1]["resumed"]
    steps = _steps(out)
    assert sorted(steps) == list(range(1, n + 1))
    # same data order, same RNG, same optimizer state: the resumed run retraces the reference
    for s in range(ck_step + 1, n + 1):
        assert steps[s]["task"] == ref_steps[s]["task"]
        assert steps[s]["loss"] == pytest.approx(ref_steps[s]["loss"], rel=1e-6, abs=1e-7), s
    with open(os.path.join(out, "ckpt", "latest")) as f:
        assert f.read().strip() == f"global_step{n}"


def test_refuses_to_overwrite_without_resume(env, tmp_path):
    out = str(tmp_path / "o")
    _run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps", "2",
          "--output_dir", out, "--no_progress"], env)
    p = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps",
                        "2", "--output_dir", out, "--no_progress"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "--resume" in p.stderr


def test_export_round_trip_from_pt(env, tmp_path):
    from uniter_fast import UniterConfig, UniterForPretraining, config_path
    torch.manual_seed(3)
    model = UniterForPretraining(UniterConfig(config_path("uniter-tiny")), 2048, 11)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pt = str(tmp_path / "in.pt")
    torch.save(sd, pt)
    ck = str(tmp_path / "conv" / "ckpt")
    _run([sys.executable, "-m", "uniter_fast.export", "from-pt", pt, ck, "--deepspeed_config",
          DS], env)
    back = str(tmp_path / "back.pt")
    _run([sys.executable, "-m", "uniter_fast.export", "to-pt", ck, back], env)
    sd2 = torch.load(back)
    assert set(sd2) == set(sd)
    for k in sd:   # through bf16 module weights / fp32 masters: exact up to bf16 rounding
        torch.testing.assert_close(sd2[k], sd[k].float(), atol=1e-2, rtol=1e-2)
    # and training continues from it
    _run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps", "2",
          "--output_dir", str(tmp_path / "conv"), "--no_progress", "--resume"], env)


def _fp16_supported():
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.skipif(not (_fp16_supported() or os.environ.get("UNITER_FAST_TEST_FORCE_FP16") == "1"),
                    reason="DeepSpeed: fp16 not supported on this device")
def test_fp16_overflow_steps_are_skipped(env, tmp_path):
    """What fp16 training must guarantee, checked step by step on the fp32 master
    weights (every step checkpointed, masters read back with DeepSpeed's
    zero_to_fp32): a step whose scaled gradients overflow is skipped and leaves
    the masters bit-identical; every other step updates them (the learning rate
    is kept > 0 from the first step on); the fp16 weights are the masters
    rounded to fp16.  Runs where DeepSpeed's CPU accelerator reports fp16
    (e.g. Xeons with AVX512-FP16); UNITER_FAST_TEST_FORCE_FP16=1 forces it
    elsewhere (fp16 arithmetic is emulated there) to exercise the logic."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from uniter_fast import UniterConfig, UniterForPretraining, config_path
    with open(DS) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": False}
    ds["scheduler"]["params"]["warmup_min_lr"] = ds["scheduler"]["params"]["warmup_max_lr"] / 4
    with open(os.path.join(ROOT, "uniter_fast", "configs", "pretrain-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    cfg["keep_checkpoints"] = 100                         # a checkpoint of every step
    cfg_path = str(tmp_path / "train16.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    train = [sys.executable, TRAIN]
    if not _fp16_supported():                             # forced: patch DeepSpeed's answer
        train = [sys.executable, "-c",
                 "import runpy, sys\n"
                 "from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
                 "CPU_Accelerator.is_fp16_supported = lambda self: True\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')", TRAIN]

    def run(name, scale_power, steps):
        ds["fp16"] = {"enabled": True, "initial_scale_power": scale_power,
                      "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1}
        path = str(tmp_path / f"ds16_{name}.json")
        with open(path, "w") as f:
            json.dump(ds, f)
        out = str(tmp_path / name)
        _run(train + ["--deepspeed_config", path, "--config", cfg_path,
                      "--num_train_steps", str(steps), "--output_dir", out, "--no_progress",
                      "--debug_rank_files", "--log_steps", "1", "--save_steps", "1",
                      "--valid_steps", "1000"], env)
        by_step = _steps(out)
        skipped = [by_step[s]["skipped_steps"] for s in range(1, steps + 1)]
        masters = [get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "ckpt"),
                                                            tag=f"global_step{s}")
                   for s in range(1, steps + 1)]
        final = torch.load(os.path.join(out, "final_weights_rank0.pt"))
        return skipped, masters, final

    torch.manual_seed(42)
    init = UniterForPretraining(UniterConfig(config_path("uniter-tiny")), 2048, 11).state_dict()
    init = {k: v.half().float() for k, v in init.items()}  # DeepSpeed's masters start from fp16

    def check(skipped, masters, final):
        prev, prev_skipped, updated = init, 0, 0
        for step, (count, m) in enumerate(zip(skipped, masters), 1):
            keys = sorted(set(m) & set(prev))
            assert len(keys) > 10 and all(torch.isfinite(m[k]).all() for k in keys)
            same = all(torch.equal(m[k], prev[k]) for k in keys)
            if count == prev_skipped + 1:
                assert same, f"step {step} overflowed (skipped) but changed the fp32 masters"
            else:
                assert count == prev_skipped, (step, skipped)
                assert not same, f"step {step} was applied but left the fp32 masters unchanged"
                updated += 1
            prev, prev_skipped = m, count
        for k in set(final) & set(masters[-1]):           # fp16 weights = masters rounded
            assert torch.equal(final[k], masters[-1][k].half().float()), k
        return updated

    # a loss scale of 2**60 overflows fp16 on every step: nothing may change
    skipped, masters, final = run("all_overflow", 60, 3)
    assert skipped == [1, 2, 3]
    assert check(skipped, masters, final) == 0
    # from 2**24 the scale halves on each overflow until the steps go through (about
    # 2**11 on a Xeon with fp16 arithmetic, 2**16 where it is emulated): both kinds of step
    skipped, masters, final = run("recovering", 24, 18)
    assert 0 < skipped[-1] < 18, skipped
    assert check(skipped, masters, final) == 18 - skipped[-1]


def test_config_overrides_map_to_deepspeed(tmp_path):
    """UNITER's optimizer keys and command-line overrides reach the DeepSpeed config."""
    from uniter_fast import train
    cfg = {"output_dir": "x", "num_train_steps": 10, "train_batch_size": 100,
           "train_datasets": [{}], "model_config": "uniter-tiny", "learning_rate": 5e-5,
           "grad_norm": 5.0, "betas": [0.9, 0.98], "weight_decay": 0.02,
           "gradient_accumulation_steps": 2, "warmup_steps": 30}
    path = str(tmp_path / "u.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    args = train.build_arg_parser().parse_args(
        ["--config", path, "--deepspeed_config", DS, "--num_train_steps", "20",
         "--zero_stage", "3", "--precision", "fp32"])
    c, d = train.load_configs(args)
    assert c["num_train_steps"] == 20
    assert d["gradient_clipping"] == 5.0 and d["gradient_accumulation_steps"] == 2
    assert d["optimizer"]["params"]["lr"] == 5e-5 and d["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert d["optimizer"]["params"]["weight_decay"] == 0.02
    assert d["scheduler"]["params"]["total_num_steps"] == 20
    assert d["scheduler"]["params"]["warmup_num_steps"] == 20      # capped at the run length
    assert d["scheduler"]["params"]["warmup_max_lr"] == 5e-5
    assert d["zero_optimization"]["stage"] == 3
    assert not d["bf16"]["enabled"] and not d["fp16"]["enabled"]
    with pytest.raises(ValueError, match="num_train_steps"):
        train.load_configs(train.build_arg_parser().parse_args(
            ["--config", path, "--deepspeed_config", DS, "--num_train_steps", "0"]))


def test_gradient_accumulation_one_task_per_optimizer_step(env, tmp_path):
    out = str(tmp_path / "ga")
    _run([sys.executable, TRAIN, "--deepspeed_config", DS, "--num_train_steps", "5",
          "--output_dir", out, "--no_progress", "--gradient_accumulation_steps", "2",
          "--debug_rank_files", "--log_steps", "1"], env)
    micro = _records(os.path.join(out, "metrics_rank0.jsonl"))
    assert len(micro) == 10
    assert all(micro[i]["task"] == micro[i + 1]["task"] for i in range(0, 10, 2))
    assert sorted(_steps(out)) == [1, 2, 3, 4, 5]
    state = torch.load(os.path.join(out, "ckpt", "global_step5", "mp_rank_00_model_states.pt"),
                       weights_only=False)
    assert state["global_steps"] == 5
