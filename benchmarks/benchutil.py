"""Shared helpers of the uniter_fast benchmarks (imported by benchmarks/bench_*.py).

Timing rule: one fast-path call and one call of every baseline per round,
interleaved, so that a shared or throttling machine slows both alike.  On
CUDA every call is bracketed by CUDA events and synchronised; on CPU it is
timed with ``time.perf_counter``.  Warm-up calls (which also absorb
compilation and autotuning) are never timed.  The speed-up is the ratio of
medians measured this way, in the same process, on the same inputs.

Settings come from environment variables so that modules can read them at
collection time:

* ``UNITER_FAST_BENCH_DEVICE``: ``auto`` (CUDA when present, else CPU), ``cpu``
  or ``cuda``.  Exactly one device per run: a GPU run has no CPU cases.
* ``UNITER_FAST_BENCH_SMOKE=1``: tiny shapes, one timed round (the test suite
  runs this so the benchmarks cannot rot).
* ``UNITER_FAST_BENCH_COMPILE=0``: leave out the torch.compile baselines.
* ``UNITER_FAST_BENCH_THREADS``: ``torch.set_num_threads`` for the run
  (default: torch's choice; the thread count is recorded either way).
* ``UNITER_FAST_BENCH_BUDGET``: seconds of timed rounds per benchmark (default
  2 on CPU, 1 on CUDA).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence

import torch

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# UNITER's pretraining mix (config/pretrain-*.json: itm 2, mlm 2, mrfr 1, mrckl 1).
MIX_RATIO = (("itm", 2), ("mlm", 2), ("mrfr", 1), ("mrc-kl", 1))


def _env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no")


SMOKE = _env_flag("UNITER_FAST_BENCH_SMOKE")
WITH_COMPILE = _env_flag("UNITER_FAST_BENCH_COMPILE", "1")


def bench_device() -> torch.device:
    want = os.environ.get("UNITER_FAST_BENCH_DEVICE", "auto").strip().lower()
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"UNITER_FAST_BENCH_DEVICE must be auto, cpu or cuda, got {want!r}")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


DEVICE = bench_device()
ON_CUDA = DEVICE.type == "cuda"


# ---------------------------------------------------------------------------
# which backends to benchmark
# ---------------------------------------------------------------------------

def skip_reason(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` of ``op`` is not benchmarked here (None: it is).

    A backend must be in ``available_backends``; the Triton interpreter on
    CPU is a correctness tool, not a fast path, so Triton backends only run
    on CUDA.
    """
    from uniter_fast import ops
    if backend not in ops.registered_backends(op):
        return f"{op}: no backend {backend!r} registered"
    if "triton" in backend.lower():
        if device.type != "cuda":
            return f"{op}/{backend}: Triton runs in the interpreter on CPU (not a fast path)"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return f"{op}/{backend}: TRITON_INTERPRET=1 is set (the interpreter is not a fast path)"
    reason = ops.unavailable_reason(op, backend, device, dtype)
    if reason is not None:
        return f"{op}/{backend} unavailable on {device.type}/{dtype}: {reason}"
    return None


def registered(op: str) -> List[str]:
    from uniter_fast import ops
    return ops.registered_backends(op)


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def sync(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device = DEVICE) -> float:
    """Seconds taken by one call of ``fn`` (device work included)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _budget() -> float:
    if "UNITER_FAST_BENCH_BUDGET" in os.environ:
        return float(os.environ["UNITER_FAST_BENCH_BUDGET"])
    return 1.0 if ON_CUDA else 2.0


def plan_rounds(per_round_s: float, *, min_rounds: int = 3, max_rounds: Optional[int] = None,
                budget_s: Optional[float] = None) -> int:
    """Rounds that fit the time budget (at least ``min_rounds``)."""
    if SMOKE:
        return 1
    if max_rounds is None:
        max_rounds = 100 if ON_CUDA else 30
    budget_s = _budget() if budget_s is None else budget_s
    n = int(budget_s / max(per_round_s, 1e-7))
    return max(min_rounds, min(max_rounds, n))


def _stats(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)
    q1 = s[len(s) // 4]
    q3 = s[(3 * len(s)) // 4] if len(s) > 1 else s[0]
    return {"median_s": statistics.median(s), "min_s": s[0], "iqr_s": q3 - q1, "rounds": len(s)}


def measure(benchmark, fast: Callable[[], object], baselines: Dict[str, Callable[[], object]],
            *, warmup: Optional[int] = None, device: torch.device = DEVICE, min_rounds: int = 3,
            max_rounds: Optional[int] = None) -> Dict[str, object]:
    """Time ``fast`` with pytest-benchmark and each baseline in the same rounds.

    Warm-up (``warmup`` calls of everything, untimed) absorbs compilation,
    autotuning and allocator growth.  Then pytest-benchmark runs ``rounds``
    rounds; before each, its (untimed) setup times one call of every
    baseline.  The fast path is timed by pytest-benchmark (wall clock, for
    its table) and by :func:`time_call` (CUDA events on GPU), and the ratio
    uses the latter for both sides.
    """
    if warmup is None:
        warmup = 2 if device.type == "cuda" else 1
    warmup = 1 if SMOKE else max(1, warmup)
    t_round = 0.0
    for i in range(warmup):
        t_fast = time_call(fast, device)
        t_base = sum(time_call(b, device) for b in baselines.values())
        if i == warmup - 1:
            t_round = t_fast + t_base
    rounds = plan_rounds(t_round, min_rounds=min_rounds, max_rounds=max_rounds)

    fast_samples: List[float] = []
    base_samples: Dict[str, List[float]] = {k: [] for k in baselines}

    def setup():
        for name, b in baselines.items():
            base_samples[name].append(time_call(b, device))
        sync(device)

    def target():
        fast_samples.append(time_call(fast, device))

    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    out: Dict[str, object] = dict(_stats(fast_samples))
    out["baselines"] = {}
    out["speedup"] = {}
    for name, samples in base_samples.items():
        st = _stats(samples)
        out["baselines"][name] = st
        out["speedup"][name] = st["median_s"] / out["median_s"]
    return out


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device = DEVICE) -> Optional[int]:
    """Peak CUDA memory allocated (all live tensors, inputs and weights
    included) during one call of ``fn``; None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Nominal (datasheet) memory bandwidth in GB/s, first matching name wins; used
# only to print achieved bandwidth as a fraction of the card's peak.
NOMINAL_MEM_GBPS = (("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350),
                    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
                    ("L40S", 864), ("A10G", 600))


def nominal_mem_gbps(card: Optional[str]) -> Optional[float]:
    for key, gbps in NOMINAL_MEM_GBPS:
        if card and key in card:
            return float(gbps)
    return None


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(env: Dict[str, object]) -> Optional[str]:
    """A warning when other processes compete for the CPU threads torch uses
    (OpenMP then stalls and CPU timings become meaningless)."""
    load, cores = env.get("loadavg_1min"), env.get("cpu_count") or 1
    threads = env.get("threads") or 1
    if env.get("device_type") == "cpu" and threads > 1 and load is not None \
            and load > 0.5 * cores:
        return (f"load average {load} on {cores} CPUs when the run started: CPU timings are "
                f"unreliable on a busy machine (UNITER_FAST_BENCH_THREADS=1 is more robust)")
    return None


def environment(device: torch.device = DEVICE) -> Dict[str, object]:
    """Where the numbers come from: card, CPU, thread count, versions."""
    env: Dict[str, object] = {
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "smoke": SMOKE,
        "loadavg_1min": _loadavg(),
        # glibc allocator settings (large tensors: mmap/trim page faults weigh on
        # every CPU timing; MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ change them)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, capability=f"{p.major}.{p.minor}",
                   gpu_memory_bytes=int(p.total_memory), sm_count=p.multi_processor_count)
        env["device_name"] = p.name
        env["nominal_mem_gbps"] = nominal_mem_gbps(p.name)
    else:
        env["card"] = None
        env["cpu_isa"] = _cpu_isa()
        n = env["threads"]
        what = f"{n} thread{'s' if n != 1 else ''}"
        if env["malloc_env"]:
            what += ", " + " ".join(f"{k}={v}" for k, v in sorted(env["malloc_env"].items()))
        isa = f", {env['cpu_isa'].upper()}" if env["cpu_isa"] else ""
        env["device_name"] = f"CPU {env['cpu_model']}{isa} ({what})"
    return env


def _cpu_isa() -> Optional[str]:
    """The widest instruction set the C++ kernels run on this CPU ("avx512", "avx2",
    "base"): CPUs of one model name differ in it (and the kernels' speed with it)."""
    try:
        from uniter_fast import _ext
        return _ext.cpu_module().cpu_isas()[0]
    except Exception:  # no extension: not recorded
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def results_filename(env: Dict[str, object], when: Optional[_dt.datetime] = None) -> str:
    when = when or _dt.datetime.now()
    if env.get("card"):
        dev = slug(str(env["card"]))
    else:
        isa = f"-{env['cpu_isa']}" if env.get("cpu_isa") else ""
        dev = f"cpu-{slug(str(env['cpu_model']))}{isa}-{env['threads']}t"
        if env.get("malloc_env"):
            dev += "-malloc"
    return f"{when:%Y-%m-%d}_{dev}{'_smoke' if env.get('smoke') else ''}.json"


class Collector:
    """Session-wide list of benchmark records, rewritten to disk after each
    record (a run cut short by a timeout keeps what it measured)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records: List[Dict[str, object]] = []
        self.env = environment()
        self.created = _dt.datetime.now().isoformat(timespec="seconds")

    def add(self, record: Dict[str, object]) -> None:
        self.env["loadavg_1min_last"] = _loadavg()
        bad = [k for k in ("median_s",) if not (isinstance(record.get(k), float)
                                                 and math.isfinite(record[k]) and record[k] > 0)]
        if bad:
            raise ValueError(f"benchmark record has no valid {bad}: {record}")
        self.records.append(record)
        self.flush()

    def document(self) -> Dict[str, object]:
        return {"schema": SCHEMA_VERSION, "created": self.created, "env": self.env,
                "results": self.records}

    def flush(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.document(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.path)


def make_record(*, op: str, group: str, mode: str, backend: str, dtype: torch.dtype,
                shape: Dict[str, object], timing: Dict[str, object], headline: bool = False,
                sweep: Optional[Dict[str, float]] = None,
                bytes_moved: Optional[float] = None, flops: Optional[float] = None,
                tokens: Optional[int] = None, peak_mem_bytes: Optional[int] = None,
                notes: Optional[str] = None) -> Dict[str, object]:
    """One result row; throughput fields are derived from the median time.

    ``sweep`` maps the name of each plotted sweep this row belongs to
    ("batch", "seq") to its x value there.
    """
    med = float(timing["median_s"])
    rec: Dict[str, object] = {
        "op": op, "group": group, "mode": mode, "backend": backend,
        "device": DEVICE.type, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
        "median_s": med, "min_s": float(timing["min_s"]), "iqr_s": float(timing["iqr_s"]),
        "rounds": int(timing["rounds"]),
        "baselines": {k: {"median_s": float(v["median_s"]), "rounds": int(v["rounds"])}
                      for k, v in timing.get("baselines", {}).items()},
        "speedup": {k: float(v) for k, v in timing.get("speedup", {}).items()},
        "headline": bool(headline), "sweep": dict(sweep or {}),
    }
    if bytes_moved is not None:
        rec["bytes_floor"] = float(bytes_moved)
        rec["gbps"] = float(bytes_moved) / med / 1e9
    if flops is not None:
        rec["flops"] = float(flops)
        rec["tflops"] = float(flops) / med / 1e12
    if tokens is not None:
        rec["tokens"] = int(tokens)
        rec["tokens_per_s"] = int(tokens) / med
    if peak_mem_bytes is not None:
        rec["peak_mem_bytes"] = int(peak_mem_bytes)
    if notes:
        rec["notes"] = notes
    return rec


def attach(benchmark, record: Dict[str, object]) -> None:
    """Copy the interesting fields into pytest-benchmark's extra_info."""
    info = benchmark.extra_info
    info.update(shape=record["shape"], dtype=record["dtype"], mode=record["mode"],
                backend=record["backend"])
    for name, r in record["speedup"].items():
        info[f"speedup_vs_{name}"] = round(r, 3)
        info[f"{name}_median_ms"] = round(record["baselines"][name]["median_s"] * 1e3, 4)
    for key in ("gbps", "tflops", "tokens_per_s", "peak_mem_bytes", "bytes_floor"):
        if key in record:
            info[key] = round(record[key], 3) if isinstance(record[key], float) else record[key]


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def lengths(n: int, lo: int, hi: int, gen: torch.Generator) -> List[int]:
    """``n`` lengths drawn uniformly from [lo, hi], the longest forced to
    ``hi`` so the padded size is exactly ``hi``."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    out = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    out[int(torch.randint(0, n, (1,), generator=gen))] = hi
    return out


def pad_mask(lens: Sequence[int], size: int, *, padded: bool) -> torch.Tensor:
    """[len(lens), size] uint8 mask: 1 = real token (or 1 = padded)."""
    ar = torch.arange(size)[None, :]
    real = ar < torch.tensor(list(lens))[:, None]
    return (~real if padded else real).to(torch.uint8)
