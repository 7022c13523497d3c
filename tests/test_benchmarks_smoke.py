"""The benchmarks cannot rot: run `pytest benchmarks --benchmark-only` in smoke
mode (tiny shapes, one round) and check what it measured and wrote; check the
timing helper's ratio and the synthetic UNITER batches on their own."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import benchutil as bu
import synthetic_batches as bb

_spec = importlib.util.spec_from_file_location("uniter_bench_report",
                                               os.path.join(BENCH, "report.py"))
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

import uniter_fast
from uniter_fast import ops


def _run_benchmarks(tmp_path, device):
    env = dict(os.environ, UNITER_FAST_BENCH_SMOKE="1", UNITER_FAST_BENCH_DEVICE=device,
               UNITER_FAST_BENCH_COMPILE="0", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UNITER_FAST_BENCH_RESULTS", None)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-rs",
         "-p", "no:cacheprovider", "--results-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, out


def _expected_backends(op, device):
    """What a run benchmarks: the available backends, minus the Triton
    interpreter on CPU, plus the CUDA-graph'd reference IPOT on CUDA (the
    smoke run leaves out the torch.compile baselines)."""
    got = {b for b in ops.available_backends(op, device, torch.float32)
           if device == "cuda" or "triton" not in b}
    if op == "ipot" and device == "cuda":
        got.add("reference+cudagraph")
    return got


def _check_smoke_run(tmp_path, device):
    proc, out = _run_benchmarks(tmp_path, device)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, log[-2000:]
    name = files[0].name
    assert name.endswith("_smoke.json")
    doc = json.loads(files[0].read_text())
    env = doc["env"]
    assert env["device_type"] == device and env["smoke"] is True
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["cpu_model"]
    if device == "cuda":
        assert env["card"] == torch.cuda.get_device_name() and env["card"] in env["device_name"]
    res = doc["results"]
    assert {r["op"] for r in res} == {"attention", "ipot", "ipot_distance",
                                      "optimal_transport_dist", "layer_norm", "gelu", "model",
                                      "itr_eval", "extract", "step"} | (
                                          {"allocator"} if device == "cpu" else set())
    ext = [r for r in res if r["op"] == "extract"]
    assert all(r["speedup"]["port"] > 0 and set(r["stage_share"]) == {
        "decode", "backbone", "rpn", "res5_head", "selection", "write"} for r in ext)
    for op in ("attention", "ipot", "layer_norm", "gelu"):
        got = {r["backend"] for r in res if r["op"] == op}
        assert got == _expected_backends(op, device), (op, got)
    got = {r["backend"] for r in res if r["op"] == "ipot_distance"}
    want = _expected_backends("ipot", device) - {"reference+cudagraph"}
    if device == "cpu" and "cpp" in want:   # + the C++ kernel's narrower instruction sets
        from uniter_fast import _ext
        want |= {f"cpp[{isa}]" for isa in _ext.cpu_module().cpu_isas()[1:]}
    assert got == want, got
    # WRA end to end (from the embeddings): every fast backend, forward and forward+backward
    wra = [r for r in res if r["op"] == "optimal_transport_dist"]
    want = _expected_backends("optimal_transport_dist", device) - {"reference"}
    assert {(r["backend"], r["mode"]) for r in wra} == {(b, m) for b in want
                                                        for m in ("fwd", "fwd+bwd")}
    assert all(set(r["speedup"]) == {"reference", "original"} for r in wra)
    for r in res:
        if r["op"] in ("ipot_distance", "optimal_transport_dist"):
            # every row also against UNITER's original op sequence
            assert "original" in r["speedup"]
            assert r["speedup"]["original"] == pytest.approx(
                r["baselines"]["original"]["median_s"] / r["median_s"])
    assert {r["shape"]["task"] for r in res if r["op"] == "model"} == \
        {"mlm", "mrfr", "mrc-kl", "itm", "mixed"}
    # the whole training step: every task, the mix and VQA; the eager columns (the smoke run
    # leaves out the compiled ones), FLOP/s against the GEMM rate of the same run
    steps = [r for r in res if r["op"] == "step"]
    assert {r["shape"]["task"] for r in steps} == {"mlm", "mrfr", "mrc-kl", "itm", "mixed", "vqa"}
    for r in steps:
        assert set(r["columns"]) == {"reference", "fast"} and r["backend"] == "fast"
        assert r["gemm_fp32_flops_per_s"] > 0 and r["flops"] > 0
        for c in r["columns"].values():
            assert c["tokens_per_s"] == pytest.approx(r["tokens"] / c["median_s"], rel=0.01)
            assert c["fraction_of_gemm_rate"] > 0 and c["peak_mem_bytes"] > 0
            assert 0 < c["executed_flops"] <= r["flops"]
            assert c["executed_fraction_of_gemm_rate"] == pytest.approx(
                c["executed_flops"] / c["median_s"] / r["gemm_fp32_flops_per_s"])
        # the reference executes UNITER's FLOPs; the fast ops fewer where the heads read
        # only some rows of the last layer (not ITM + WRA: it reads them all)
        assert r["columns"]["reference"]["executed_flops"] == r["flops"]
        pruned = r["columns"]["fast"]["executed_flops"] < r["flops"]
        assert pruned == (r["shape"]["task"] != "itm"), r["shape"]["task"]
        assert r["cpu_allocator"] == ("kept" if device == "cpu" else "default")
    if device == "cpu":   # glibc's default malloc, then freed memory kept (same process)
        alloc = [r for r in res if r["op"] == "allocator"]
        assert {r["shape"]["task"] for r in alloc} == {"mlm", "itm"}
        for r in alloc:
            assert r["speedup"]["glibc-default"] == pytest.approx(
                r["baselines"]["glibc-default"]["median_s"] / r["median_s"])
    for r in res:
        assert r["device"] == device
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        if r["backend"] == "reference":
            assert set(r["speedup"]) == ({"original"} if r["op"] == "ipot_distance" else set())
            continue
        if r["op"] == "allocator":
            continue
        if r["op"] == "extract":    # images/s against the same detector run as the ports run it
            assert set(r["speedup"]) == {"port"}
            assert r["speedup"]["port"] == pytest.approx(
                r["baselines"]["port"]["median_s"] / r["median_s"])
            assert r["images_per_s"] == pytest.approx(r["shape"]["images"] / r["median_s"])
            assert r["flops"] > 0 and 0 < r["fraction_of_gemm_rate"]
            continue
        assert set(r["speedup"]) >= {"reference"}
        ref_t = r["baselines"]["reference"]["median_s"]
        assert r["speedup"]["reference"] == pytest.approx(ref_t / r["median_s"])
        if r["op"] == "itr_eval":   # full-ranking retrieval: pairs/s against the original loop
            assert set(r["speedup"]) == {"reference", "loop+auto"}
            assert r["pairs_per_s"] == pytest.approx(r["pairs"] / r["median_s"])
        if r["op"] in ("model", "itr_eval", "step"):
            assert r["tokens"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
            assert (r.get("peak_mem_bytes", 0) > 0) == (device == "cuda")
        else:
            assert r["gbps"] == pytest.approx(r["bytes_floor"] / r["median_s"] / 1e9)
    # the pytest-benchmark table and the speed-up summary are printed
    assert "speed-ups" in log and "results written to" in log
    # the report turns this file into a table and plots
    assert report.main([str(files[0]), "--include-smoke", "--plots-dir",
                        str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").glob("*_attention.png"))


def test_benchmarks_smoke_run_on_cpu(tmp_path):
    _check_smoke_run(tmp_path, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmarks_smoke_run_on_cuda(tmp_path):
    _check_smoke_run(tmp_path, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_benchmarks_skip_cleanly_without_gpu(tmp_path):
    proc, out = _run_benchmarks(tmp_path, "cuda")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert " passed" not in log and "skipped" in log
    assert "no CUDA GPU" in log
    assert not list(out.glob("*.json"))


class _FakeBenchmark:
    """Stands in for pytest-benchmark's fixture (pedantic with a setup)."""

    def __init__(self):
        self.rounds = None

    def pedantic(self, target, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        self.rounds = rounds
        for _ in range(rounds):
            if setup:
                setup()
            target()


def test_measure_ratio_is_baseline_over_fast(monkeypatch):
    monkeypatch.setattr(bu, "SMOKE", False)
    monkeypatch.setenv("UNITER_FAST_BENCH_BUDGET", "0.2")
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.002)

    def slow():
        calls["slow"] += 1
        time.sleep(0.008)

    fb = _FakeBenchmark()
    t = bu.measure(fb, fast, {"slow": slow}, warmup=2, device=torch.device("cpu"),
                   min_rounds=5, max_rounds=7)
    assert 5 <= fb.rounds <= 7 and t["rounds"] == fb.rounds
    assert calls == {"fast": fb.rounds + 2, "slow": fb.rounds + 2}   # warm-up untimed
    assert t["baselines"]["slow"]["rounds"] == fb.rounds
    assert 0.002 <= t["median_s"] < 0.006
    assert 2.0 < t["speedup"]["slow"] < 4.5


def test_lengths_and_masks():
    g = torch.Generator().manual_seed(3)
    lens = bu.lengths(50, 4, 9, g)
    assert len(lens) == 50 and max(lens) == 9 and min(lens) >= 4
    m = bu.pad_mask([2, 0, 3], 3, padded=False)
    assert m.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert bu.pad_mask([2, 0, 3], 3, padded=True).tolist() == [[0, 0, 1], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        bu.lengths(3, 5, 4, g)


def test_skip_rule_excludes_triton_on_cpu_only():
    for op in ("attention", "ipot", "ipot_distance", "cost_matrix_cosine",
               "optimal_transport_dist"):
        for be in ops.registered_backends(op):
            reason = bu.skip_reason(op, be, torch.device("cpu"), torch.float32)
            if "triton" in be:
                assert reason and "interpreter" in reason
            elif be in ops.available_backends(op, "cpu", torch.float32):
                assert reason is None
            else:
                assert reason and "unavailable" in reason


@pytest.mark.parametrize("task", bb.TASKS)
def test_synthetic_batches_follow_uniter_layout(task):
    b = bb.make_batch(task, 5, (3, 7), (2, 6), vocab_size=50, img_dim=8, img_label_dim=6,
                      seed=1)
    ids, attn, gidx = b["input_ids"], b["attn_masks"], b["gather_index"]
    feat = b["img_feat"]
    max_tl, max_nbb = ids.size(1), feat.size(1)
    assert max_tl == 7 and max_nbb == 6
    assert b["position_ids"].tolist() == [list(range(max_tl))]
    # lengths from the padding: text ids are > 0, regions have non-zero position features
    tls = (ids > 0).sum(1).tolist()
    nbbs = (b["img_pos_feat"].abs().sum(-1) > 0).sum(1).tolist()
    assert attn.sum(1).tolist() == [t + n for t, n in zip(tls, nbbs)]
    assert attn.size(1) == max(t + n for t, n in zip(tls, nbbs))
    # gather_index puts text first, then the regions (stored after max_tl), then padding
    for i, (t, n) in enumerate(zip(tls, nbbs)):
        assert attn[i, :t + n].eq(1).all() and attn[i, t + n:].eq(0).all()
        assert gidx[i, :t].tolist() == list(range(t))
        assert gidx[i, t:t + n].tolist() == list(range(max_tl, max_tl + n))
        assert ids[i, t:].eq(0).all()
    if task == "mlm":
        lab = b["txt_labels"]
        assert (lab != -1).sum(1).ge(1).all()
        assert ((lab != -1) & (ids == 0)).sum() == 0          # only real tokens are masked
    elif task in ("mrfr", "mrc-kl"):
        masks, tgt = b["img_masks"], b["img_mask_tgt"]
        assert masks.sum(1).ge(1).all()
        assert masks.sum() == tgt.sum()
        for i, t in enumerate(tls):
            assert tgt[i, t:t + max_nbb][:nbbs[i]].tolist() == masks[i, :nbbs[i]].tolist()
        assert feat[masks].abs().sum() == 0                    # masked regions are zeroed
        if task == "mrfr":
            assert b["feat_targets"].shape == (int(masks.sum()), 8)
            assert b["feat_targets"].abs().sum(-1).gt(0).all()
        else:
            lt = b["label_targets"]
            assert lt.shape == (int(masks.sum()), 6)
            torch.testing.assert_close(lt.sum(-1), torch.ones(lt.size(0)))
    else:
        ot = b["ot_inputs"]
        assert set(b["targets"].tolist()) == {0, 1}
        assert ot["txt_pad"].tolist() == bu.pad_mask(tls, max_tl, padded=True).tolist()
        assert ot["img_pad"].tolist() == bu.pad_mask(nbbs, max_nbb, padded=True).tolist()
        assert ot["scatter_max"] == int(ot["ot_scatter"].max())
        for i, t in enumerate(tls):   # joint position j >= t goes to max_tl + (j - t)
            row = ot["ot_scatter"][i]
            assert row[:t].tolist() == list(range(t))
            assert row[t:].tolist() == list(range(max_tl, max_tl + attn.size(1) - t))


@pytest.mark.parametrize("task", bb.TASKS)
def test_synthetic_batches_run_through_the_model(task):
    cfg = uniter_fast.UniterConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32)
    model = uniter_fast.UniterForPretraining(cfg, 8, 6).eval()
    b = bb.make_batch(task, 4, (3, 7), (2, 6), vocab_size=120, img_dim=8, img_label_dim=6,
                      seed=2)
    with torch.no_grad():
        out = model(b, task)
    loss = uniter_fast.itm_ot_loss(*out, 0.1) if task == "itm" else out.mean()
    assert torch.isfinite(loss)


def test_device_check_script_parses():
    script = os.path.join(BENCH, "device_check.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="dry run for a machine without CUDA")
def test_device_check_dry_run_without_gpu(tmp_path):
    """The whole script runs through on a CPU machine: every CUDA test and
    benchmark skips, nothing is measured, the log lands in $OUT."""
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_CHECK_NO_INSTALL="1",
               DEVICE_CHECK_BUDGET="400", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(BENCH, "device_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (tmp_path / "device_check.log").read_text()
    for stage in ("machine", "install (offline)", "CUDA tests", "benchmarks", "report"):
        assert f"] {stage}" in log
    assert "CUDA tests exit status: 0" in log and "benchmarks exit status: 0" in log
    bench = log[log.index("] benchmarks"):log.index("] report")]
    assert "skipped" in bench and " passed" not in bench and "no CUDA GPU" in bench
    assert "no results were written" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuda_tests.log", "device_check.log"]


def test_busy_machine_warning():
    busy = dict(device_type="cpu", threads=2, cpu_count=2, loadavg_1min=3.0)
    assert "unreliable" in bu.busy_warning(busy)
    assert bu.busy_warning(dict(busy, threads=1)) is None        # one thread copes
    assert bu.busy_warning(dict(busy, loadavg_1min=0.5)) is None
    assert bu.busy_warning(dict(busy, device_type="cuda")) is None


def test_results_file_names_carry_date_and_device():
    import datetime
    when = datetime.datetime(2026, 11, 27, 12, 0)
    gpu = dict(card="NVIDIA H100 80GB HBM3", smoke=False)
    assert bu.results_filename(gpu, when) == "2026-11-27_nvidia-h100-80gb-hbm3.json"
    cpu = dict(card=None, cpu_model="AMD EPYC 7B13", threads=2, smoke=True)
    assert bu.results_filename(cpu, when) == "2026-11-27_cpu-amd-epyc-7b13-2t_smoke.json"
    tuned = dict(cpu, smoke=False, malloc_env={"MALLOC_TRIM_THRESHOLD_": "-1"})
    assert bu.results_filename(tuned, when) == "2026-11-27_cpu-amd-epyc-7b13-2t-malloc.json"
    # the C++ kernels' instruction set tells CPUs of one model name apart
    assert bu.results_filename(dict(cpu, smoke=False, cpu_isa="avx2"), when) == \
        "2026-11-27_cpu-amd-epyc-7b13-avx2-2t.json"


def test_cpu_device_name_records_glibc_allocator_settings(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    env = bu.environment(torch.device("cpu"))
    assert env["malloc_env"] == {}
    assert env["device_name"].endswith(("thread)", "threads)"))
    if env["cpu_isa"]:
        assert f", {env['cpu_isa'].upper()} (" in env["device_name"]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    env = bu.environment(torch.device("cpu"))
    assert env["malloc_env"] == {"MALLOC_MMAP_THRESHOLD_": "1073741824"}
    assert "MALLOC_MMAP_THRESHOLD_=1073741824)" in env["device_name"]


def test_a_benchmark_file_named_on_the_command_line_is_collected_once():
    env = dict(os.environ, UNITER_FAST_BENCH_SMOKE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_ipot.py", "--benchmark-only",
         "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and len(ids) == len(set(ids)), ids


def test_attention_thresholds_script_writes_a_loadable_module(tmp_path):
    mod_path, res = tmp_path / "thr.py", tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "attention_thresholds.py"), "--grid", "4", "8",
         "--dtypes", "float32", "--shape", "2", "2", "8", "--budget", "0.01", "--max-rounds", "3",
         "--write", "--module", str(mod_path), "--results-dir", str(res)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("thr", mod_path)
    thr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thr)
    assert set(thr.SDPA_MIN_SEQ) == {"float32"}
    assert set(thr.SDPA_MIN_SEQ["float32"]) == {"fwd", "fwd+bwd"}
    assert all(v in (4, 8, 9) for v in thr.SDPA_MIN_SEQ["float32"].values())
    assert thr.MEASURED["grid"] == [4, 8] and thr.MEASURED["threads"] == 1
    (raw,) = res.glob("*.json")
    doc = json.loads(raw.read_text())
    assert doc["thresholds"] == thr.SDPA_MIN_SEQ and len(doc["timings"]) == 2


def test_attention_threshold_rule():
    spec = importlib.util.spec_from_file_location(
        "uniter_attention_thresholds", os.path.join(BENCH, "attention_thresholds.py"))
    at = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(at)

    def pts(*wins):
        return [{"seq": 16 * (i + 1), "reference_s": 1.0, "sdpa_s": 0.5 if w else 2.0}
                for i, w in enumerate(wins)]
    assert at.threshold(pts(True, True, True)) == 16          # SDPA everywhere
    assert at.threshold(pts(False, True, True)) == 32
    assert at.threshold(pts(True, False, True)) == 48          # a loss in between: from after it
    assert at.threshold(pts(False, False, False)) == 49        # never: one past the grid
