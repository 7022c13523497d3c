"""UNITER's two key ablations, small: conditional vs joint masking, WRA vs none.

    python -m uniter_fast.ablation [--seeds 0 1 2] [--num_train_steps N] [--jobs 2]

Trains the tiny model on the built-in synthetic data (the default pretraining
config, ``uniter_fast/configs/pretrain-synthetic-tiny.json``) in three settings,
each over the given training seeds (same data, steps and masking rates):

* (a) conditional masking + WRA (itm_ot_lambda 0.1): the default run;
* (b) joint random masking (MLM examples also lose 15% of their regions, MRM
  examples 15% of their tokens; the loss stays on the masked modality);
* (d) itm_ot_lambda 0 (no WRA loss; (c) is (a)).

All settings are validated the same way (conditional: the other modality
intact).  Prints two tables, mean +- standard deviation over seeds: object-word
MLM and object-region MRC-KL accuracy at the last validation but one (step
2000 of 3000: learning speed) and at the end for (a) vs (b);
WRA matched-vs-mismatched pair accuracy, word->region and phrase->region
alignment from the transport plan and ITM accuracy for (c) vs (d); and writes
them with every run's validations to ``<out>/ablation.json`` and
``<out>/ablation.md``.  Finished runs found in ``--out`` are reused.

``--precision auto`` (default) trains in ds.json's precision, except in fp32 on a
CPU without native bf16 (bf16 is emulated there, several times slower).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .training.config import bf16_emulated, read_json
from .training.pretrain import DEFAULT_CONFIG

__all__ = ["SETTINGS", "TABLES", "main", "run_setting", "format_tables"]

#: name -> (description, training-config overrides)
SETTINGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "conditional": ("(a)/(c) conditional masking, itm_ot_lambda 0.1 (default)", {}),
    "joint": ("(b) joint random masking", {"masking": "joint"}),
    "no_wra": ("(d) itm_ot_lambda 0 (no WRA loss)", {"itm_ot_lambda": 0.0}),
}

#: (title, [(setting, row label)], [(metric key in a validation record, column label, step)]);
#: step None: the run's last validation, "prev": the one before (mid-run learning speed)
TABLES = (
    ("Masking: conditional (a) vs joint (b)",
     [("conditional", "(a) conditional"), ("joint", "(b) joint")],
     [("mlm_synthetic/obj_acc", "MLM object-word acc", "prev"),
      ("mlm_synthetic/obj_acc", "MLM object-word acc", None),
      ("mrckl_synthetic/obj_acc", "MRC-KL object-region acc", "prev"),
      ("mrckl_synthetic/obj_acc", "MRC-KL object-region acc", None),
      ("mrfr_synthetic/loss_vs_mean", "MRFR loss / mean baseline", None)]),
    ("WRA: itm_ot_lambda 0.1 (c) vs 0 (d)",
     [("conditional", "(c) lambda 0.1"), ("no_wra", "(d) lambda 0")],
     [("wra_synthetic/ot_pair_acc", "WRA pair acc (matched closer)", None),
      ("wra_synthetic/align_acc", "WRA word->region acc", None),
      ("wra_synthetic/phrase_align_acc", "WRA phrase->region acc", None),
      ("itm_synthetic/acc", "ITM acc", None)]),
)


def _validations(metrics_path: str) -> Optional[List[Dict[str, float]]]:
    """The validation records of a *finished* run (None if it did not finish)."""
    if not os.path.exists(metrics_path):
        return None
    vals, ended = [], False
    with open(metrics_path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("event") == "validation":
                vals.append(r)
            elif r.get("event") == "end":
                ended = True
    return vals if ended and vals else None


def _at(vals: List[Dict[str, float]], step) -> Dict[str, float]:
    """The validation record ``step``: None the last, "prev" the one before it."""
    if step is None or len(vals) < 2:
        return vals[-1]
    return vals[-2]


def run_setting(name: str, seed: int, out: str, base_cfg: Dict[str, Any], ds_config: str,
                steps: Optional[int], log, precision: Optional[str] = None
                ) -> List[Dict[str, float]]:
    """Train one (setting, seed) with train.py in a subprocess; its validation records."""
    run_dir = os.path.join(out, f"{name}-seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    done = _validations(metrics)
    if done is not None:
        log(f"{name} seed {seed}: reusing {run_dir}")
        return done
    if os.path.exists(run_dir):
        raise ValueError(f"{run_dir} holds an unfinished run: delete it to rerun")
    cfg = dict(base_cfg, **SETTINGS[name][1], seed=int(seed), output_dir=run_dir)
    if steps:
        cfg["num_train_steps"] = int(steps)
        cfg["valid_steps"] = max(1, int(steps) // 3)
        cfg["save_steps"] = int(steps)
        cfg["warmup_steps"] = min(int(cfg.get("warmup_steps", 0)), int(steps) // 10 or 1)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, f"{name}-seed{seed}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    cmd = [sys.executable, "-m", "uniter_fast.train", "--config", cfg_path,
           "--deepspeed_config", ds_config, "--no_progress"]
    if precision:
        cmd += ["--precision", precision]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({p.returncode}): {' '.join(cmd)}\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    log(f"{name} seed {seed}: done in {time.time() - t:.0f} s")
    vals = _validations(metrics)
    if vals is None:
        raise RuntimeError(f"{name} seed {seed}: no validation record in {metrics}")
    return vals


def _stats(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_tables(results: Dict[str, List[List[Dict[str, float]]]], seeds: Sequence[int]) -> str:
    """Markdown tables: mean ± standard deviation over seeds, then the per-seed values."""
    lines = []
    for title, rows, cols in TABLES:
        heads = []
        for key, label, step in cols:
            if step is not None:
                some = next(iter(results.values()))[0]
                label = f"{label}, step {_at(some, step)['step']}"
            heads.append(label)
        lines += [f"**{title}** ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
                  "| setting | " + " | ".join(heads) + " |",
                  "|---|" + "---:|" * len(cols)]
        for setting, label in rows:
            if setting not in results:
                continue
            cells = []
            for key, _, step in cols:
                vals = [_at(r, step)[key] for r in results[setting] if key in _at(r, step)]
                if not vals:
                    cells.append("n/a")
                    continue
                m, sd = _stats(vals)
                cells.append(f"{m:.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num_train_steps", type=int, default=None,
                   help="steps per run (default: the config's)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="base training config")
    p.add_argument("--deepspeed_config", default="ds.json")
    p.add_argument("--out", default=os.path.join("output", "ablation"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="training precision; auto: ds.json's, but fp32 where bf16 would be "
                        "emulated (a CPU without native bf16)")
    args = p.parse_args(argv)
    if not os.path.exists(args.deepspeed_config):
        raise ValueError(f"DeepSpeed config {args.deepspeed_config} not found "
                         "(run from the repository root or pass --deepspeed_config)")
    base = read_json(args.config, "training config")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")

    def log(msg):
        print(msg, flush=True)

    precision = args.precision
    if precision == "auto":
        ds = read_json(args.deepspeed_config, "DeepSpeed config")
        precision = "fp32" if bf16_emulated(ds) else None
    jobs = [(s, seed) for seed in args.seeds for s in args.settings]
    if os.environ.get("OMP_NUM_THREADS") is None and args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"    # the runs share the cores
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futs = {job: pool.submit(run_setting, job[0], job[1], args.out, base,
                                 args.deepspeed_config, args.num_train_steps, log, precision)
                for job in jobs}
        results = {s: [futs[(s, seed)].result() for seed in args.seeds] for s in args.settings}
    table = format_tables(results, args.seeds)
    steps = args.num_train_steps or base["num_train_steps"]
    head = (f"UNITER ablations on the synthetic data: {steps} steps per run, precision "
            f"{precision or 'of ' + args.deepspeed_config}, {len(jobs)} runs, "
            f"{time.time() - t0:.0f} s wall\n")
    print(head + "\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(head + "\n" + table)
    record = {"seeds": args.seeds, "num_train_steps": steps, "precision": precision, "settings":
              {s: SETTINGS[s][0] for s in args.settings}, "results": results}
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
