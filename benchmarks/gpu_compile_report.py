#!/usr/bin/env python
"""Compile every GPU kernel for Hopper (sm_90) and Ampere (sm_80) without a GPU,
and report registers, spills, shared memory and an occupancy estimate.

    python benchmarks/gpu_compile_report.py                 # full report -> benchmarks/results/gpu_compile/
    python benchmarks/gpu_compile_report.py --fast --out-dir /tmp/x   # the test's subset

Triton kernels (kernels/*.py): the launchers themselves run on CPU tensors
with the kernels replaced by recorders, so every launch is compiled with the
exact signature, constexprs and specialisation (16-byte alignment,
divisibility by 16, unit strides) the JIT would use for that call, through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.  An
autotuned kernel is compiled at every config its autotuner keeps for the call
(``Autotuner.prune_configs``: "pickable"), for fp16 / bf16 / fp32, head dims
32 / 64 / 80 / 128, with and without dropout (attention) and for a range of
IPOT shapes (both IPOT variants, plan and/or distance).  ``ptxas -v`` (the one
in the triton wheel) on the PTX gives registers and spill bytes; shared memory
is Triton's dynamic allocation plus ptxas' static.  The CUDA kernel
(csrc/ipot_cuda.cu) is compiled with ``nvcc -arch=sm_XX -Xptxas -v``.

Occupancy estimate per SM from registers (allocated per warp in units of 256),
shared memory (plus 1 KiB reserved per block) and threads: resident blocks =
min of the three limits and 32; occupancy = resident warps / 64.  It is an
estimate from the compiler's numbers, not a measurement.

A row fails the gate when it does not compile, when a pickable config
spills, or when its shared memory exceeds the SM's per-block limit.  Exit
status 1 when any row fails.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)   # compile for real: must precede any triton import

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch
import triton
from gpu_gate import ARCHS, failures, occupancy, parse_ptxas, sources_digest
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import uniter_fast  # noqa: F401  (exposes kernels/ as uniter_fast.kernels)
from uniter_fast.kernels import attention_triton as AT
from uniter_fast.kernels import ipot_triton as IT

OUT_DIR = os.path.join(HERE, "results", "gpu_compile")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 80, 128)
# IPOT (B, M, N): tiny, UNITER's 60x100 and its transpose (the register variant's
# largest tiles), and the streaming variant (128x128, 150x140, 512x512, 100x1000)
IPOT_SHAPES = ((4, 13, 17), (4, 60, 100), (4, 100, 60), (4, 128, 128), (4, 150, 140),
               (2, 512, 512), (2, 100, 1000))
ATT_SEQ = 100        # not a multiple of 16 (as most lengths); bucket 128: every config pickable
ATT_HEADS = 12


# ----------------------------------------------------------------- recording launches

@dataclass
class Launch:
    kernel: str                      # the jit function's name
    fn: Any                          # JITFunction
    args: Tuple
    kwargs: Dict[str, Any]
    tuner: Any = None                # the Autotuner when the launch went through one


@dataclass
class Job:
    kernel: str
    fn: Any
    args: Tuple
    kwargs: Dict[str, Any]
    arch: int
    meta: Dict[str, Any] = field(default_factory=dict)   # what the row reports
    pickable: bool = True


class _Recorder:
    """Stands in for a jit kernel or an autotuner inside a launcher."""

    def __init__(self, launches: List[Launch], fn, tuner=None):
        self.launches, self.fn, self.tuner = launches, fn, tuner

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.fn.__name__, self.fn, args, kwargs, self.tuner))
        return launch


def _jit_fn(obj):
    return obj.fn if hasattr(obj, "configs") else obj       # autotuner -> its jit function


@contextlib.contextmanager
def _recording(module, names: Sequence[str]):
    launches: List[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, obj in saved.items():
            tuner = obj if hasattr(obj, "configs") else None
            setattr(module, n, _Recorder(launches, _jit_fn(obj), tuner))
        yield launches
    finally:
        for n, obj in saved.items():
            setattr(module, n, obj)


def attention_launches(dtype: torch.dtype, head_dim: int, dropout: bool) -> List[Launch]:
    """Forward and backward launches of the fused attention for one case."""
    B, H, S, D = 2, ATT_HEADS, ATT_SEQ, head_dim
    q = torch.empty(B, S, H, D, dtype=dtype).transpose(1, 2)     # the model's layout
    k, v, do = (torch.empty_like(q) for _ in range(3))
    bias = torch.zeros(B, S)
    p = 0.1 if dropout else 0.0
    names = ("_attn_fwd_kernel", "_fwd_tuned", "_attn_bwd_delta_kernel", "_dkdv_tuned",
             "_dq_tuned", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    with _recording(AT, names) as launches:
        o, lse = AT._forward(q, k, v, bias, 0.125, p, 1234, 0)
        AT._backward(do, q, k, v, o, lse, bias, 0.125, p, 1234, 0)
    if dropout:   # the debug mask kernel (dtype and head dim independent)
        with _recording(AT, ("_keep_mask_kernel",)) as extra:
            AT.dropout_keep_mask(B, H, S, p, 1234, 0, device="cpu")
        launches += extra
    return launches


def ipot_launches(dtype: torch.dtype, shape, with_plan: bool, with_dist: bool) -> List[Launch]:
    B, M, N = shape
    C = torch.empty(B, M, N, dtype=dtype)
    tp = torch.zeros(B, M, dtype=torch.bool)
    ip = torch.zeros(B, N, dtype=torch.bool)
    saved = IT.check_launchable
    IT.check_launchable = lambda *a: None          # CPU tensors stand in for CUDA ones
    try:
        with _recording(IT, ("_ipot_register_kernel", "_ipot_streaming_kernel")) as launches:
            IT._run(C, tp, ip, 0.5, 50, 1, with_plan, with_dist)
    finally:
        IT.check_launchable = saved
    return launches


_ATT_KERNEL = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv",
               "_attn_bwd_dq_kernel": "dq"}


def expand(launch: Launch, arch: int, meta: Dict[str, Any]) -> List[Job]:
    """One job per config the launch may run with (autotuned: every candidate
    of its list for the dtype, marked pickable when the autotuner keeps it for
    this call)."""
    if launch.tuner is None:
        kw = dict(launch.kwargs)
        cfg = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BM", "BN", "BR") if k in kw}
        cfg["num_warps"] = kw.get("num_warps", 4)
        cfg["num_stages"] = kw.get("num_stages", 3)
        return [Job(launch.kernel, launch.fn, launch.args, kw, arch, dict(meta, config=cfg))]
    tuner = launch.tuner
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        kept = tuner.prune_configs(dict(launch.kwargs))
    finally:
        tuner.nargs = None
    short = _ATT_KERNEL.get(launch.kernel)
    cands = AT.tuning_candidates(short, launch.args[0].dtype) if short else tuner.configs
    jobs = []
    for c in cands:
        kw = dict(launch.kwargs, **c.all_kwargs())
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        jobs.append(Job(launch.kernel, launch.fn, launch.args, kw, arch, dict(meta, config=cfg),
                        pickable=c in kept))
    return jobs


def triton_jobs(archs: Sequence[int], fast: bool) -> List[Job]:
    jobs: List[Job] = []
    for arch in archs:
        for dname, dtype in DTYPES.items():
            for hd in HEAD_DIMS:
                for dropout in (False, True):
                    if fast and not (hd == 128 and dropout and dname in ("bf16", "fp32")):
                        continue
                    for launch in attention_launches(dtype, hd, dropout):
                        meta = dict(op="attention", dtype=dname, head_dim=hd, dropout=dropout)
                        if launch.kernel == "_keep_mask_kernel":
                            if dname != "fp32" or hd != 128:
                                continue
                            meta = dict(op="attention", dtype="-", head_dim="-", dropout=True)
                        js = expand(launch, arch, meta)
                        if fast:   # the largest tiles and the default one
                            js = [j for j in js if j.meta["config"].get("num_warps") == 8
                                  or j.meta["config"].get("BLOCK_M", 64) == 64
                                  and j.meta["config"].get("BLOCK_N", 64) == 64
                                  and j.meta["config"].get("num_stages") == 2] or js[:1]
                        jobs += js
        for dname in DTYPES:
            for shape in IPOT_SHAPES:
                variants = ((True, False), (True, True), (False, True)) if dname == "fp32" \
                    else ((True, True),)
                for with_plan, with_dist in variants:
                    if fast and (shape not in ((4, 60, 100), (4, 150, 140)) or dname != "fp32"):
                        continue
                    for launch in ipot_launches(DTYPES[dname], shape, with_plan, with_dist):
                        what = "+".join(n for n, on in (("plan", with_plan), ("distance", with_dist))
                                        if on)
                        jobs += expand(launch, arch, dict(
                            op="ipot", dtype=dname, shape="x".join(map(str, shape[1:])),
                            outputs=what))
    return jobs


# ----------------------------------------------------------------- compiling

def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def specialize(job: Job):
    """(target, signature, constexprs, attrs, options) the JIT would compile this launch with."""
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    fn = job.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*job.args, **job.kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, job.kwargs, bound, spec, opts)
    return target, sig, constexprs, attrs, options


def compile_key(job: Job) -> str:
    """Two launches with the same key compile to the same binary (e.g. head dims 80 and 128)."""
    _, sig, constexprs, attrs, options = specialize(job)
    return repr((job.kernel, job.arch, sorted(sig.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


def compile_job(job: Job) -> Dict[str, Any]:
    row = dict(job.meta, kernel=job.kernel, arch=f"sm_{job.arch}", pickable=job.pickable)
    t0 = time.perf_counter()
    try:
        target, sig, constexprs, attrs, options = specialize(job)
        fn = job.fn
        kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                                options=options.__dict__)
        gpu = f"sm_{job.arch}a" if job.arch >= 90 else f"sm_{job.arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            res = subprocess.run([ptxas_path(), "-v", "-lineinfo", f"--gpu-name={gpu}", ptx,
                                  "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
        stats = parse_ptxas(res.stderr + res.stdout)
        warps = int(kernel.metadata.num_warps)
        smem = int(kernel.metadata.shared) + stats["static_smem"]
        row.update(stats, status="ok", num_warps=warps, smem_bytes=smem,
                   **occupancy(job.arch, stats["registers"], smem, warps))
    except Exception as e:  # a compile error is a row of the report
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[-1500:]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


_JOBS: List[Job] = []


def _run_index(i: int) -> Dict[str, Any]:
    return compile_job(_JOBS[i])


def compile_all(jobs: List[Job], workers: int) -> Tuple[List[Dict[str, Any]], int]:
    """A row per job; identical compiles run once.  Returns (rows, compiles)."""
    global _JOBS
    keys = [compile_key(j) for j in jobs]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    _JOBS = [jobs[i] for i in first.values()]
    done: List[Dict[str, Any]] = []
    t0 = time.perf_counter()

    def progress(row):
        done.append(row)
        if len(done) % 50 == 0 or len(done) == len(_JOBS):
            print(f"  {len(done)}/{len(_JOBS)} compiled ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if workers <= 1:
        for j in _JOBS:
            progress(compile_job(j))
    else:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for row in pool.map(_run_index, range(len(_JOBS)), chunksize=2):
                progress(row)
    by_key = dict(zip(first, done))
    rows = []
    for job, key in zip(jobs, keys):
        stats = {k: v for k, v in by_key[key].items()
                 if k in ("status", "error", "registers", "spill_stores", "spill_loads",
                          "static_smem", "num_warps", "smem_bytes", "blocks_per_sm",
                          "occupancy", "limited_by", "compile_s")}
        rows.append(dict(job.meta, kernel=job.kernel, arch=f"sm_{job.arch}",
                         pickable=job.pickable, **stats))
    return rows, len(_JOBS)


# ----------------------------------------------------------------- CUDA (nvcc)

_NVCC_FN = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")


def cuda_rows(archs: Sequence[int]) -> List[Dict[str, Any]]:
    nvcc = shutil.which("nvcc")
    src = os.path.join(ROOT, "csrc", "ipot_cuda.cu")
    rows = []
    for arch in archs:
        if nvcc is None:
            rows.append(dict(op="ipot", kernel="ipot_cuda.cu", arch=f"sm_{arch}", status="error",
                             error="nvcc not on PATH", pickable=True))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([nvcc, "-c", src, "-o", os.path.join(tmp, "k.o"), "-O3",
                                  "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v"],
                                 capture_output=True, text=True, timeout=600)
        log = res.stdout + res.stderr
        if res.returncode:
            rows.append(dict(op="ipot", kernel="ipot_cuda.cu", arch=f"sm_{arch}", status="error",
                             error=log[-2000:], pickable=True))
            continue
        parts = _NVCC_FN.split(log)
        # parts: [pre, name, arch, body, name, arch, body, ...]
        for name, _, body in zip(parts[1::3], parts[2::3], parts[3::3]):
            stats = parse_ptxas(body)
            dtype = next((d for key, d in (("IfE", "fp32"), ("I6__half", "fp16"),
                                           ("I13__nv_bfloat16", "bf16"), ("IdE", "fp64"))
                          if key in name), "?")
            # launch: 256 threads; dynamic smem at UNITER's 60 x 100 when A, Q fit
            warps, M, N = 8, 60, 100
            dyn = 2 * (M + N) * 4 + 2 * M * N * 4
            smem = dyn + stats["static_smem"]
            rows.append(dict(op="ipot", kernel="ipot_kernel (csrc/ipot_cuda.cu)", dtype=dtype,
                             shape="60x100", config={"threads": 256}, arch=f"sm_{arch}",
                             pickable=True, status="ok", num_warps=warps, smem_bytes=smem,
                             **stats, **occupancy(arch, stats["registers"], smem, warps)))
    return rows


# ----------------------------------------------------------------- the gate and the report

def _tool_version(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\S+), (V\S+)", out)
    return m.group(2) if m else None


def markdown(doc: Dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [f"# GPU compile report ({doc['generated']})", "",
             f"Generated by `python benchmarks/gpu_compile_report.py` on a machine without a GPU: "
             f"triton {doc['triton']} (`triton.compile` to sm_90a / sm_80 machine code, its "
             f"bundled ptxas {doc['ptxas']}), nvcc {doc['nvcc']}.  Sources digest "
             f"`{doc['sources_sha256'][:16]}`.  {len(rows)} rows, "
             f"{sum(r['pickable'] for r in rows)} pickable by autotune; "
             f"**{len(doc['failures'])} gate failures**.", "",
             "Occupancy = resident warps per SM / 64, estimated from registers (per-warp "
             "allocation of 256), shared memory (+1 KiB per block) and threads; not measured.", ""]
    for f in doc["failures"]:
        lines.append(f"* FAIL: {f}")
    lines += ["", "## Summary (pickable configs)", "",
              "| kernel | arch | rows | pickable | registers | spills | max smem (KiB) | "
              "occupancy |", "|---|---|---:|---:|---|---:|---:|---|"]
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in groups.items():
        ok = [r for r in rs if r["pickable"] and r["status"] == "ok"]
        if not ok:
            lines.append(f"| {kernel} | {arch} | {len(rs)} | 0 | | | | |")
            continue
        regs = [r["registers"] for r in ok]
        occ = [r["occupancy"] for r in ok]
        lines.append(f"| {kernel} | {arch} | {len(rs)} | {len(ok)} | {min(regs)}-{max(regs)} | "
                     f"{sum(r['spill_stores'] + r['spill_loads'] for r in ok)} B | "
                     f"{max(r['smem_bytes'] for r in ok) / 1024:.1f} | "
                     f"{min(occ):.2f}-{max(occ):.2f} |")
    lines += ["", "## All rows", ""]
    head = ("| op | kernel | arch | dtype | head dim / shape | dropout / outputs | config | "
            "pickable | regs | spills (st/ld B) | smem (KiB) | occupancy | limited by |")
    lines += [head, "|" + "---|" * 13]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['kernel']} | {r['arch']} | {r.get('dtype', '')} | | | "
                         f"{r.get('config', '')} | {r['pickable']} | ERROR | | | | |")
            continue
        cfg = " ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items())
        lines.append(
            f"| {r['op']} | {r['kernel']} | {r['arch']} | {r.get('dtype', '')} | "
            f"{r.get('head_dim', r.get('shape', ''))} | "
            f"{r.get('dropout', r.get('outputs', ''))} | {cfg} | "
            f"{'yes' if r['pickable'] else 'no'} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['smem_bytes'] / 1024:.1f} | "
            f"{r['occupancy']:.2f} ({r['blocks_per_sm']} blk) | {r['limited_by']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true",
                    help="a subset: head dim 128 with dropout, bf16/fp32, the largest and the "
                         "default tiles, two IPOT shapes (what tests/test_gpu_compile.py runs)")
    ap.add_argument("--archs", type=int, nargs="*", default=sorted(ARCHS, reverse=True))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out-dir", default=OUT_DIR)
    args = ap.parse_args(list(argv) if argv is not None else None)
    for a in args.archs:
        if a not in ARCHS:
            ap.error(f"--archs: {a} not in {sorted(ARCHS)}")

    t0 = time.perf_counter()
    jobs = triton_jobs(args.archs, args.fast)
    rows, compiles = compile_all(jobs, args.jobs)
    rows += cuda_rows(args.archs)
    doc = {"generated": f"{dt.datetime.now():%Y-%m-%d}", "fast": args.fast,
           "archs": {f"sm_{a}": ARCHS[a] for a in args.archs},
           "triton": triton.__version__, "torch": torch.__version__,
           "ptxas": _tool_version([ptxas_path(), "--version"]),
           "nvcc": _tool_version([shutil.which("nvcc") or "nvcc", "--version"]),
           "sources_sha256": sources_digest(), "compiles": compiles, "rows": rows,
           "failures": failures(rows),
           "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "report_fast" if args.fast else "report")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(doc))
    print(f"{len(rows)} rows ({compiles} Triton compiles) in {doc['seconds']} s; "
          f"{len(doc['failures'])} failures; written to {stem}.json / .md")
    for line in doc["failures"]:
        print("FAIL:", line)
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
