"""The default pretraining run eager and with ``--compile``: speed and recompilations.

    python benchmarks/compile_default_run.py [--steps 200] [--out benchmarks/results/compile]

Runs ``deepspeed uniter_fast/train.py --deepspeed_config ds.json --num_train_steps N``
with ``--no-compile`` and with ``--compile`` (same seed and data), ``--repeat`` times in
alternation, with ``TORCH_LOGS=recompiles`` and, for each compiled run, an empty inductor
cache (``TORCHINDUCTOR_CACHE_DIR``: the compile time of a first run), and writes
``<date>_<device>_default-run-<N>.json`` / ``.md``: the wall time of each run, its
steady-state speed (steps/s between step 30 and the last, after the compilations), every
compilation of the (first) compiled run with the guard that caused it, its graph breaks,
and the final validation of both side by side.
"""
import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchutil as bu

STEADY_FROM = 30


def run(name, extra, steps, work, env):
    out = os.path.join(work, name)
    log = os.path.join(work, f"{name}.log")
    cmd = ["deepspeed", os.path.join(ROOT, "uniter_fast", "train.py"), "--deepspeed_config",
           os.path.join(ROOT, "ds.json"), "--num_train_steps", str(steps), "--output_dir", out,
           "--no_progress", "--log_steps", "10", *extra]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); log: {log}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps_rec = {r["step"]: r for r in recs if "tokens_per_s" in r}
    end = next(r for r in recs if r.get("event") == "end")
    val = [r for r in recs if r.get("event") == "validation"][-1]
    a, b = steps_rec[STEADY_FROM], steps_rec[steps]
    # the record names no path of this machine: the repository's relative, the run's dir
    # under $WORK (a temporary directory)
    command = " ".join(cmd[1:]).replace(ROOT + "/", "").replace(work, "$WORK")
    return {"command": command, "wall_s": wall,
            "train_wall_s": end["train_wall_s"], "elapsed_at_last_step_s": b["elapsed_s"],
            "steady_steps_per_s": (steps - STEADY_FROM) / (b["elapsed_s"] - a["elapsed_s"]),
            "compile": end.get("compile"), "validation": val,
            "recompiles": recompile_reasons(log)}


def recompile_reasons(log):
    """[(entry, the guard of the previous entry that failed)] from TORCH_LOGS=recompiles."""
    lines = open(log).read().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"\[0/(\d+)\] \[__recompiles\] Recompiling function", line)
        if not m:
            continue
        n = int(m.group(1))
        for later in lines[i + 1:i + 40]:
            t = later.split("[__recompiles]")[-1].strip()
            if t.startswith(f"- 0/{n - 1}:"):
                out.append([n, re.sub(r"\s+#.*", "", t[len(f"- 0/{n - 1}:"):]).strip()])
                break
    return out


def markdown(doc):
    e, c = doc["runs"]["eager"], doc["runs"]["compiled"]
    lines = [f"# The default run, eager and compiled ({doc['date']}, {doc['device']})", "",
             f"`{c['command']}` against the same with `--no-compile`, one after the other; "
             f"load average {doc['loadavg_before']} before, {doc['loadavg_after']} after "
             "(a shared 2-core VM: other jobs ran too).", "",
             "| | eager | compiled |", "|---|---:|---:|",
             f"| wall time of the command | {e['wall_s']:.0f} s | {c['wall_s']:.0f} s |",
             f"| training + final validation (`train_wall_s`) | {e['train_wall_s']:.1f} s | "
             f"{c['train_wall_s']:.1f} s |",
             f"| steady state, steps {STEADY_FROM}-{doc['steps']} | "
             f"{e['steady_steps_per_s']:.1f} steps/s | {c['steady_steps_per_s']:.1f} steps/s "
             f"(**{c['steady_steps_per_s'] / e['steady_steps_per_s']:.2f}×**) |",
             "| steady-state ratio, compiled / eager, every repeat | | "
             + ", ".join(f"{r:.2f}×" for r in doc["steady_ratios"]) + " |",
             "| wall time, every repeat | "
             + ", ".join(f"{p['eager']['wall_s']:.0f} s" for p in doc["repeats"]) + " | "
             + ", ".join(f"{p['compiled']['wall_s']:.0f} s" for p in doc["repeats"]) + " |",
             f"| compilations (first + recompilations) | – | {c['compile']['compilations']} |",
             f"| graph breaks | – | {c['compile']['graph_breaks']} |", "",
             "Every recompilation of the first compiled run and the guard of the previous graph "
             "that failed:", "", "| graph | guard that failed |", "|---:|---|"]
    lines += [f"| {n} | `{g}` |" for n, g in c["recompiles"]]
    lines += ["", "Final validation (same seed, same data; fp32):", "",
              "| metric | eager | compiled |", "|---|---:|---:|"]
    for k, v in sorted(e["validation"].items()):
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} | {c['validation'].get(k, float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compile"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    env = dict(os.environ, TORCH_LOGS="recompiles", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    before = os.getloadavg()[0]
    pairs = []
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeat):
            cold = dict(env, TORCHINDUCTOR_CACHE_DIR=os.path.join(work, f"inductor{i}"))
            pairs.append({"eager": run(f"eager{i}", ["--no-compile"], args.steps, work, env),
                          "compiled": run(f"compiled{i}", ["--compile"], args.steps, work,
                                          cold)})
    runs = dict(pairs[0])
    ratios = [p["compiled"]["steady_steps_per_s"] / p["eager"]["steady_steps_per_s"]
              for p in pairs]
    envinfo = bu.environment()
    doc = {"date": f"{dt.date.today()}", "device": envinfo["device_name"], "steps": args.steps,
           "loadavg_before": round(before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "env": envinfo, "runs": runs, "repeats": pairs, "steady_ratios": ratios}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{doc['date']}_{bu.slug(envinfo['device_name'])}_"
                                  f"default-run-{args.steps}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
