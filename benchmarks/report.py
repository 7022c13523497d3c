#!/usr/bin/env python
"""Turn benchmark result files into plots and the performance table (docs/performance.md).

    python benchmarks/report.py                               # all benchmarks/results/*.json
    python benchmarks/report.py run.json --plots-dir out/
    python benchmarks/report.py --doc docs/performance.md     # rewrite the table in place

The table goes between ``<!-- perf-table:begin -->`` and
``<!-- perf-table:end -->``; nothing else in that page is touched (``--readme``
is the old name of ``--doc``: the table lived in the README before).  One
table row per headline benchmark and fast backend.  Rows are merged across
all result files of a device: for each (device, row key) -- op, mode,
backend, dtype, shape -- the row of the newest file wins, so re-running one
benchmark replaces only its own rows.  Every row names its device and the
date of the file it came from; the footnote lists every file that
contributed a row.  GB/s is the
memory floor (bytes an ideal kernel must move) over the median time; on a
known card also as a share of its datasheet bandwidth.  Plots: one PNG
per result file and op, speed-up over the reference against batch size and
against sequence length (one line per backend).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = "docs/performance.md"        # the page holding the table, relative to the repository root
BEGIN = "<!-- perf-table:begin -->"
END = "<!-- perf-table:end -->"
OP_ORDER = ("model", "itr_eval", "attention", "ipot", "ipot_distance", "optimal_transport_dist",
            "layer_norm", "gelu")
TASK_ORDER = ("mlm", "mrfr", "mrc-kl", "mrc", "itm", "mixed")
MODE_ORDER = ("fwd", "fwd+bwd")
SWEEP_LABEL = {"batch": "batch size", "seq": "sequence length (padded)"}


# ---------------------------------------------------------------- loading

def load(path: str) -> Dict[str, object]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "env" not in doc or "results" not in doc:
        raise ValueError(f"{path}: not a uniter_fast benchmark result file (needs env, results)")
    for r in doc["results"]:
        for key in ("op", "mode", "backend", "median_s", "speedup", "shape"):
            if key not in r:
                raise ValueError(f"{path}: a result has no {key!r}: {r}")
    doc["_path"] = path
    return doc


def device_name(doc: Dict[str, object]) -> str:
    env = doc["env"]
    return str(env.get("device_name") or env.get("card") or env.get("cpu_model"))


def run_date(doc: Dict[str, object]) -> str:
    return str(doc.get("created", ""))[:10]


def _age(doc: Dict[str, object]) -> Tuple[str, str, str]:
    """Oldest first; files created in the same second are ordered by name."""
    return (str(doc.get("created", "")), os.path.basename(doc["_path"]), doc["_path"])


def table_rows(doc: Dict[str, object]) -> List[Dict[str, object]]:
    """The rows of a file that go into the table: headline, fast backend, with a
    reference baseline."""
    return [r for r in doc["results"] if r.get("headline") and r["backend"] != "reference"
            and "reference" in r["speedup"]]


def row_key(r: Dict[str, object]) -> Tuple[str, str, str, str, str]:
    """What identifies a table row across result files of one device."""
    return (str(r["op"]), str(r["mode"]), str(r["backend"]), str(r.get("dtype", "")),
            json.dumps(r["shape"], sort_keys=True, default=str))


def merge_per_device(docs: Sequence[Dict[str, object]]
                     ) -> List[Tuple[str, List[Tuple[Dict[str, object], Dict[str, object]]]]]:
    """[(device, [(source file, row), ...]), ...]: per device, the table rows of all
    its files, the newest file's row for each ``row_key``.  GPUs first, then CPUs,
    by name; rows in table order.  Independent of the order of ``docs``."""
    merged: Dict[str, Dict[Tuple[str, ...], Tuple[Dict[str, object], int, Dict[str, object]]]] = {}
    is_gpu: Dict[str, bool] = {}
    for doc in sorted(docs, key=_age):                  # newer files overwrite older rows
        dev = device_name(doc)
        is_gpu[dev] = is_gpu.get(dev, False) or doc["env"].get("device_type") == "cuda"
        rows = merged.setdefault(dev, {})
        for i, r in enumerate(table_rows(doc)):
            rows[row_key(r)] = (doc, i, r)
    out = []
    for dev in sorted(merged, key=lambda d: (not is_gpu[d], d)):
        picked = sorted(merged[dev].values(),
                        key=lambda t: (_row_key(t[2]), _age(t[0]), t[1]))
        if picked:
            out.append((dev, [(doc, r) for doc, _, r in picked]))
    return out


# ---------------------------------------------------------------- formatting

def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def describe(r: Dict[str, object]) -> Tuple[str, str]:
    """(benchmark name, shape text) of a result row."""
    s, op, dt = r["shape"], r["op"], r.get("dtype", "")
    if op == "model":
        name = f"model step {s.get('task')}"
        shape = (f"{s.get('config')} ({s.get('layers')} layers, hidden {s.get('hidden')}), "
                 f"B={s.get('B')}, {s.get('precision', dt)}")
    elif op == "attention":
        name = f"attention {r['mode']}"
        shape = (f"B={s['B']} H={s['H']} D={s['D']} L={s['len_min']}..{s['len_max']}, {dt}")
    elif op in ("ipot", "ipot_distance"):
        name = "ipot (WRA plan)" if op == "ipot" else "ipot + trace(C·T) (WRA distance)"
        shape = f"B={s['B']} {s['M']}×{s['N']} it={s['iteration']}, {dt}"
    elif op == "optimal_transport_dist":
        name = f"WRA distance from embeddings {r['mode']} (cost + ipot + trace)"
        shape = f"B={s['B']} {s['M']}×{s['N']} D={s['D']} it={s['iteration']}, {dt}"
    elif op == "itr_eval":
        name = "retrieval eval, full ranking: fast scorer vs the original per-caption loop"
        pairs = (s["texts"] * s["images"] if isinstance(s.get("texts"), int)
                 and isinstance(s.get("images"), int) else "?")
        shape = (f"{s.get('config')} ({s.get('layers')} layers, hidden {s.get('hidden')}), "
                 f"{s.get('texts')} captions × {s.get('images')} images = {pairs} pairs, "
                 f"{s.get('precision', dt)}")
    else:
        name = f"{op} {r['mode']}"
        shape = ", ".join(f"{k}={v}" for k, v in s.items()) + f", {dt}"
    return name, shape


# How a row's non-reference baselines are named in the table, per op (default: the
# baseline's own name); the reference baseline of itr_eval is the original loop on
# the reference ops.
BASELINE_LABEL = {"itr_eval": {"reference": "original loop, reference ops",
                               "loop+auto": "the loop on fast ops"}}


def baseline_label(r: Dict[str, object], name: str) -> str:
    return BASELINE_LABEL.get(r["op"], {}).get(name, name)


def throughput(r: Dict[str, object], peak_gbps: Optional[float] = None) -> str:
    parts = []
    if "pairs_per_s" in r:
        text = fmt_si(r["pairs_per_s"], "pairs/s")
        base = r.get("baseline_pairs_per_s") or {}
        if base:   # reference first, then the other baselines by name
            names = sorted(base, key=lambda k: (k != "reference", k))
            text += " vs " + ", ".join(f"{fmt_si(base[k], 'pairs/s')} ({baseline_label(r, k)})"
                                       for k in names)
        parts.append(text)
    if "tokens_per_s" in r:
        parts.append(fmt_si(r["tokens_per_s"], "tok/s"))
    if "gbps" in r:
        frac = f" ({100 * r['gbps'] / peak_gbps:.0f}% of peak)" if peak_gbps else ""
        parts.append(f"{r['gbps']:.3g} GB/s{frac}")
    if r.get("peak_mem_bytes"):
        parts.append(f"{r['peak_mem_bytes'] / 2**30:.2f} GiB peak")
    return ", ".join(parts) or "–"


def _row_key(r: Dict[str, object]):
    op = r["op"]
    s = r["shape"]
    return (OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), op,
            TASK_ORDER.index(s["task"]) if s.get("task") in TASK_ORDER else 9, MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER else 9,
            s.get("B", 0), r["backend"])


def table(docs: Sequence[Dict[str, object]]) -> str:
    """Markdown table of the headline results, newest file per device."""
    lines = ["| Benchmark | Shape | Backend | Time (median) | Reference | Speed-up | "
             "Throughput | Device | Date |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    sources = set()
    for dev, rows in merge_per_device(docs):
        for doc, r in rows:
            sources.add(os.path.basename(doc["_path"]))
            peak = doc["env"].get("nominal_mem_gbps")
            name, shape = describe(r)
            ref_t = r["baselines"]["reference"]["median_s"]
            speed = f"**{r['speedup']['reference']:.2f}×**"
            others = [f"{v:.2f}× vs {baseline_label(r, k)}" for k, v in r["speedup"].items()
                      if k != "reference"]
            if others:
                speed += " (" + ", ".join(others) + ")"
            lines.append(f"| {name} | {shape} | {r['backend']} | {fmt_time(r['median_s'])} | "
                         f"{fmt_time(ref_t)} | {speed} | {throughput(r, peak)} | {dev} | "
                         f"{run_date(doc)} |")
    if len(lines) == 2:
        raise ValueError("no headline results with a reference baseline in the given files")
    src = ", ".join(sorted(sources))
    lines.append("")
    lines.append(f"<sub>Generated by `python benchmarks/report.py --doc {DOC}` from "
                 f"{src}. Speed-up = reference median / backend median, timed in the same run "
                 f"on the same inputs.</sub>")
    return "\n".join(lines) + "\n"


def write_doc(path: str, text: str) -> None:
    """Replace the table between the perf-table markers of the markdown file ``path``."""
    with open(path, encoding="utf-8") as f:
        old = f.read()
    i, j = old.find(BEGIN), old.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{path}: markers {BEGIN} ... {END} not found (in that order)")
    new = old[:i + len(BEGIN)] + "\n" + text + old[j:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


write_readme = write_doc          # the old name


# ---------------------------------------------------------------- plots

def sweep_series(doc: Dict[str, object], op: str
                 ) -> Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]]:
    """{(sweep, mode): {backend: [(x, speed-up vs reference), ...]}}."""
    out: Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]] = {}
    for r in doc["results"]:
        if r["op"] != op or "reference" not in r["speedup"]:
            continue
        for sweep, x in (r.get("sweep") or {}).items():
            series = out.setdefault((sweep, r["mode"]), {})
            series.setdefault(r["backend"], []).append((float(x), r["speedup"]["reference"]))
    for series in out.values():
        for pts in series.values():
            pts.sort()
    return out


def plot(doc: Dict[str, object], out_dir: str) -> List[str]:
    """One PNG per op with a sweep; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(os.path.basename(doc["_path"]))[0]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ops = sorted({r["op"] for r in doc["results"]},
                 key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else len(OP_ORDER))
    for op in ops:
        panels = sweep_series(doc, op)
        panels = {k: v for k, v in panels.items() if any(len(p) >= 1 for p in v.values())}
        if not panels:
            continue
        keys = sorted(panels, key=lambda k: (k[0], MODE_ORDER.index(k[1])
                                             if k[1] in MODE_ORDER else 9))
        ncol = min(2, len(keys))
        nrow = (len(keys) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[len(keys):]:
            ax.set_visible(False)
        for ax, key in zip(flat, keys):
            sweep, mode = key
            ticks = set()
            for backend, pts in sorted(panels[key].items()):
                xs, ys = zip(*pts)
                ticks.update(xs)
                ax.plot(xs, ys, marker="o", label=backend)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([f"{t:g}" for t in sorted(ticks)])
            ax.minorticks_off()
            ax.set_xlabel(SWEEP_LABEL.get(sweep, sweep))
            ax.set_ylabel("speed-up vs reference (×)")
            ax.set_title(f"{op} {mode}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{device_name(doc)} — {run_date(doc)}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- CLI

def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="result JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--plots-dir", default=None,
                    help="where PNGs go (default: next to each result file)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--doc", "--readme", dest="doc", default=None, metavar="PATH",
                    help=f"rewrite the table between the perf-table markers of this markdown file "
                         f"(the published one: {DOC}; --readme is the old name)")
    ap.add_argument("--table-out", default=None, help="also write the table to this file")
    ap.add_argument("--include-smoke", action="store_true",
                    help="accept results of smoke runs (tiny shapes)")
    args = ap.parse_args(list(argv) if argv is not None else None)

    files = args.files or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    if not files:
        print("no result files", file=sys.stderr)
        return 1
    docs = []
    for f in files:
        d = load(f)
        if d["env"].get("smoke") and not args.include_smoke:
            print(f"skipping smoke-run file {f}", file=sys.stderr)
            continue
        docs.append(d)
    if not docs:
        print("no usable result files", file=sys.stderr)
        return 1
    if not args.no_plots:
        for d in docs:
            for p in plot(d, args.plots_dir or os.path.dirname(os.path.abspath(d["_path"]))):
                print(f"wrote {p}", file=sys.stderr)
    text = table(docs)
    if args.table_out:
        with open(args.table_out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.doc:
        write_doc(args.doc, text)
        print(f"updated {args.doc}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
