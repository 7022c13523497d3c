#!/usr/bin/env python
"""Where float32 IPOT computes the plan: the search behind
``IPOT_FAST_MAX_COST_OVER_BETA`` and ``IPOT_FAST_MAX_ITERATIONS``.

    python benchmarks/ipot_float32_range.py              # the grid below, 12 seeds a cell
    python benchmarks/ipot_float32_range.py --seeds 4    # quicker
    python benchmarks/ipot_float32_range.py --device cuda   # the GPU kernels only

Every float32 IPOT backend available here (the C++ kernel and the float32
reference on a CPU; the Triton and CUDA kernels too on a GPU) is handed
adversarial costs directly, without the op's routing, at beta = 1 and cost
span r (so C/beta spans exactly r), for r and the iteration count on a grid.
Each plan is compared with :func:`uniter_fast.reference.ot.ipot_log_domain`,
the float64 log-domain updates (tests/test_ipot_small_beta.py checks that
against an independent transcription).  A case "differs" when its largest
plan error exceeds the tests' tolerance 1/m · (1e-6 + 2 · t · r · 2^-24).
The ops hand the kernels only costs inside a cell where nothing differed.
Counts per cell go to ``benchmarks/results/ipot_float32_range/<date>_<device>.{json,md}``.

Families (:func:`adversarial`): "binary" (entries 0 or r: ties everywhere),
"perm" (the first min(m, n) rows have one 0 each in a random column, every
other entry is r: the optimal plan needs costly entries that first decay for
many iterations), "cos2" (1 - cos of 2-d embeddings), "uniform".
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from benchutil import cpu_model, slug

from uniter_fast.constants import IPOT_FAST_MAX_COST_OVER_BETA, IPOT_FAST_MAX_ITERATIONS
from uniter_fast.ops import _registry, available_backends
from uniter_fast.reference.ot import ipot_log_domain

FAMILIES = ("binary", "perm", "cos2", "uniform")
SHAPES = ((5, 7), (37, 13), (13, 37), (23, 9), (1, 7), (7, 1), (60, 100))
RATIOS = (4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0)
ITERATIONS = (50, 100, 150)
OUT_DIR = os.path.join(HERE, "results", "ipot_float32_range")


def adversarial(family: str, m: int, n: int, ratio: float, seed: int) -> torch.Tensor:
    """A float32 cost [1, m, n] spanning exactly ``ratio`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if family == "binary":
        C = (torch.rand(m, n, generator=g, dtype=torch.float64) < 0.5).double()
    elif family == "perm":
        C = torch.ones(m, n, dtype=torch.float64)
        p = torch.randperm(max(m, n), generator=g)[:min(m, n)]
        C[torch.arange(min(m, n)), p % n] = 0
    elif family == "cos2":
        x = torch.nn.functional.normalize(torch.randn(m, 2, generator=g, dtype=torch.float64), dim=1)
        y = torch.nn.functional.normalize(torch.randn(n, 2, generator=g, dtype=torch.float64), dim=1)
        C = 1 - x @ y.t()
    elif family == "uniform":
        C = torch.rand(m, n, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    C = C - C.min()
    C = C / C.max() if C.max() > 0 else C
    return (ratio * C).float()[None]


def plan_tolerance(m: int, iteration: int, ratio: float) -> float:
    return (1e-6 + 2 * iteration * ratio * 2.0 ** -24) / m


def kernel_error(backend: str, device: str, C: torch.Tensor, iteration: int, ratio: float,
                 T64: torch.Tensor = None) -> float:
    """Largest |T - T64| of ``backend`` called directly (no routing), over the tolerance;
    T64 defaults to :func:`ipot_log_domain`'s plan."""
    m, n = C.shape[1:]
    tp = torch.zeros(1, m, dtype=torch.bool, device=device)
    ip = torch.zeros(1, n, dtype=torch.bool, device=device)
    fn = _registry.resolve("ipot", backend, torch.device(device), torch.float32)
    T = fn(C.to(device), tp, ip, 1.0, iteration, 1).cpu().double()
    if T64 is None:
        T64 = ipot_log_domain(C, tp.cpu(), ip.cpu(), 1.0, iteration, 1).double()
    err = (T - T64).abs().max().item() if torch.isfinite(T).all() else float("inf")
    return err / plan_tolerance(m, iteration, ratio)


def float32_backends(device: str = "all") -> List[tuple]:
    """(backend, device) pairs: the CPU ones (not Triton's interpreter) and the GPU ones."""
    out = []
    if device in ("all", "cpu"):
        out += [(b, "cpu") for b in available_backends("ipot", "cpu") if b != "triton"]
    if device in ("all", "cuda") and torch.cuda.is_available():
        out += [(b, "cuda") for b in available_backends("ipot", "cuda")]
    return out


def sweep(seeds: int, backends, ratios=RATIOS, iterations=ITERATIONS) -> List[Dict]:
    """One row per backend, span, iteration count and family."""
    rows = []
    for ratio in ratios:
        for iteration in iterations:
            for family in FAMILIES:
                acc = {b: dict(backend=b[0], device=b[1], ratio=ratio, iteration=iteration,
                               family=family, cases=0, differ=0, worst_err_over_tol=0.0,
                               first_differing=None) for b in backends}
                for m, n in SHAPES:
                    for seed in range(max(1, seeds // 3) if (m, n) == (60, 100) else seeds):
                        C = adversarial(family, m, n, ratio, seed)
                        T64 = ipot_log_domain(C, torch.zeros(1, m, dtype=torch.bool),
                                              torch.zeros(1, n, dtype=torch.bool),
                                              1.0, iteration, 1).double()
                        for b in backends:
                            e = kernel_error(*b, C, iteration, ratio, T64)
                            r = acc[b]
                            r["cases"] += 1
                            r["worst_err_over_tol"] = max(r["worst_err_over_tol"], e)
                            if e > 1:
                                r["differ"] += 1
                                r["first_differing"] = r["first_differing"] or f"{m}x{n} seed {seed}"
                rows += acc.values()
            for b in backends:
                cell = [r for r in rows if (r["backend"], r["device"], r["ratio"], r["iteration"])
                        == (*b, ratio, iteration)]
                print(f"{b[0]}/{b[1]} span {ratio:g}·beta, {iteration} iterations: "
                      f"{sum(r['differ'] for r in cell)} of {sum(r['cases'] for r in cell)} differ",
                      flush=True)
    return rows


def markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# float32 IPOT against float64 ({meta['device']}, {meta['date']})", "",
             f"Cases whose plan differs / cases, per backend; the ops' range is span <= "
             f"{meta['fast_max_cost_over_beta']:g}·beta and <= {meta['fast_max_iterations']} "
             f"iterations. Command: `{meta['command']}`.", ""]
    its = sorted({r["iteration"] for r in rows})
    for backend in dict.fromkeys(f"{r['backend']}/{r['device']}" for r in rows):
        lines += [f"## {backend}", "", "| span / beta | " + " | ".join(f"{t} it" for t in its) + " |",
                  "|---|" + "---|" * len(its)]
        for ratio in sorted({r["ratio"] for r in rows}):
            cells = []
            for t in its:
                sel = [r for r in rows if f"{r['backend']}/{r['device']}" == backend
                       and r["ratio"] == ratio and r["iteration"] == t]
                d, c = sum(r["differ"] for r in sel), sum(r["cases"] for r in sel)
                fams = ", ".join(r["family"] for r in sel if r["differ"])
                cells.append(f"{d}/{c}" + (f" ({fams})" if fams else ""))
            lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=12, help="seeds per family and shape")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="which backends: the CPU ones, the GPU ones or all available")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--out-dir", default=OUT_DIR, help=f"where the tables go (default {OUT_DIR})")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    backends = float32_backends(args.device)
    if not backends:
        print(f"no float32 IPOT backend available for --device {args.device}", file=sys.stderr)
        return 2
    rows = sweep(args.seeds, backends)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_model()}")
    now = dt.datetime.now()
    meta = dict(device=device, date=now.strftime("%Y-%m-%d"), seeds=args.seeds,
                torch=torch.__version__, fast_max_cost_over_beta=IPOT_FAST_MAX_COST_OVER_BETA,
                fast_max_iterations=IPOT_FAST_MAX_ITERATIONS,
                command="python benchmarks/ipot_float32_range.py"
                        + (f" --seeds {args.seeds}" if args.seeds != 12 else ""))
    inside = [r for r in rows if r["ratio"] <= IPOT_FAST_MAX_COST_OVER_BETA
              and r["iteration"] <= IPOT_FAST_MAX_ITERATIONS]
    bad = [r for r in inside if r["differ"]]
    md = markdown(rows, meta)
    print(md)
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        base = os.path.join(args.out_dir, f"{meta['date']}_{slug(device)}")
        with open(base + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md + "\n")
        print(f"wrote {base}.json and .md")
    if bad:
        print(f"inside the ops' range {len(bad)} cells differ: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
