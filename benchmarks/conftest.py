"""pytest setup of the benchmarks: ``pytest benchmarks/ --benchmark-only``.

Modules are named ``bench_*.py`` and collected here (the root configuration
only collects ``tests/``).  Results are written as JSON when asked:

* ``--save-results``            → ``benchmarks/results/<date>_<device>.json``
* ``--results-dir DIR``         → ``DIR/<date>_<device>.json``
  (or the environment variable ``UNITER_FAST_BENCH_RESULTS=DIR``)

The file is rewritten after every benchmark, so a run that is cut short keeps
what it measured.  ``python benchmarks/report.py`` turns result files into
plots and the table of docs/performance.md.
"""
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("uniter_fast") is None:  # source checkout, not pip-installed
    sys.path.insert(0, os.path.dirname(HERE))

import benchutil

# Benchmarks run first where they matter most: headline shapes, then the
# torch.compile'd baselines (long compilations), then the sweeps.
_ORDER = ("bench_ipot", "bench_attention", "bench_model", "bench_extract", "bench_layer_norm")


def pytest_addoption(parser):
    group = parser.getgroup("uniter_fast benchmarks")
    group.addoption("--save-results", action="store_true", default=False,
                    help="write a results JSON under benchmarks/results/")
    group.addoption("--results-dir", default=None,
                    help="write the results JSON into this directory")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is already collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _settle_allocator():
    """glibc serves large blocks with mmap until the first time it frees an
    mmapped block, then raises its mmap and trim thresholds to that size and
    serves them from the heap.  Until that happens every large tensor costs a
    fresh mmap and a page fault per 4 KiB on first touch, which made the first
    benchmarks of a run (and their plain-PyTorch references above all) up to
    ~2x slower than later ones.  Freeing one ~31 MB block first gives every
    benchmark the steady state of a long-running process."""
    import torch
    block = torch.empty(31_000_000 // 4, dtype=torch.float32)
    block.fill_(0.0)
    del block


def pytest_configure(config):
    import torch
    threads = os.environ.get("UNITER_FAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    _settle_allocator()


def pytest_collection_modifyitems(config, items):
    import torch
    if benchutil.ON_CUDA and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="UNITER_FAST_BENCH_DEVICE=cuda but no CUDA GPU here")
        for item in items:
            item.add_marker(skip)
    def key(item):
        mod = item.module.__name__ if getattr(item, "module", None) else ""
        rank = _ORDER.index(mod) if mod in _ORDER else len(_ORDER)
        sweep = "sweep" in item.name
        compiled = "compile" in item.name or "flex" in item.name  # long first call
        return (sweep, compiled, rank)
    items.sort(key=key)  # stable: keeps file order within a rank


def _results_path(config):
    out_dir = config.getoption("--results-dir") or os.environ.get("UNITER_FAST_BENCH_RESULTS")
    if not out_dir and config.getoption("--save-results"):
        out_dir = os.path.join(HERE, "results")
    if not out_dir:
        return None
    env = benchutil.environment()
    name = benchutil.results_filename(env)
    path = os.path.join(out_dir, name)
    if os.path.exists(path):  # never overwrite an earlier run of the same day
        stem, ext = os.path.splitext(name)
        import datetime
        path = os.path.join(out_dir, f"{stem}_{datetime.datetime.now():%H%M%S}{ext}")
    return path


@pytest.fixture(scope="session")
def collector(request):
    c = benchutil.Collector(_results_path(request.config))
    request.config._uniter_bench_collector = c
    return c


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    c = getattr(config, "_uniter_bench_collector", None)
    if c is None or not c.records:
        return
    tr = terminalreporter
    tr.section(f"uniter_fast speed-ups ({c.env['device_name']})")
    for r in c.records:
        if not r["speedup"]:
            continue
        ratios = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
        tr.write_line(f"{r['group']:<44} {r['backend']:<22} {r['median_s'] * 1e3:10.3f} ms  "
                      f"{ratios}")
    warning = benchutil.busy_warning(c.env)
    if warning:
        tr.write_line(f"WARNING: {warning}", yellow=True)
    if c.path:
        tr.write_line(f"results written to {c.path}")
