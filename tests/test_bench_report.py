"""benchmarks/report.py: result files -> the perf table of docs/performance.md and plots (on sample files)."""
import copy
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_report():
    spec = importlib.util.spec_from_file_location(
        "bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load_report()

H100 = "NVIDIA H100 80GB HBM3"


def _row(op, backend, median_s, ref_s=None, *, mode="fwd", shape=None, headline=True,
         sweep=None, extra=None, others=None):
    r = {"op": op, "group": f"{op} {mode}", "mode": mode, "backend": backend,
         "device": "cuda", "dtype": "bfloat16", "shape": shape or {}, "median_s": median_s,
         "min_s": median_s, "iqr_s": 0.0, "rounds": 10, "baselines": {}, "speedup": {},
         "headline": headline, "sweep": sweep or {}}
    for name, t in ([("reference", ref_s)] if ref_s else []) + list((others or {}).items()):
        r["baselines"][name] = {"median_s": t, "rounds": 10}
        r["speedup"][name] = t / median_s
    r.update(extra or {})
    return r


ATT = {"B": 128, "H": 12, "D": 64, "S": 170, "len_min": 96, "len_max": 170, "real_tokens": 17000}
SAMPLE = {
    "schema": 1, "created": "2026-11-20T10:00:00",
    "env": {"device_type": "cuda", "card": H100, "device_name": H100, "threads": 16,
            "cpu_model": "Intel Xeon", "torch": "2.11.0", "triton": "3.6.0", "smoke": False,
            "nominal_mem_gbps": 3000.0},
    "results": [
        _row("attention", "triton", 1.2e-3, 3.0e-3, shape=ATT, sweep={"batch": 128, "seq": 170},
             others={"sdpa": 1.5e-3}, extra={"gbps": 1500.0}),
        _row("attention", "sdpa", 1.5e-3, 3.0e-3, shape=ATT, sweep={"batch": 128, "seq": 170}),
        _row("attention", "reference", 3.0e-3, shape=ATT, sweep={"batch": 128}),
        _row("attention", "triton", 0.5e-3, 0.8e-3, shape=dict(ATT, B=32), headline=False,
             sweep={"batch": 32}),
        _row("attention", "triton", 4.0e-3, 2.0e-3, mode="fwd+bwd", shape=ATT,
             sweep={"batch": 128}),
        _row("ipot", "cuda", 80e-6, 8e-3,
             shape={"B": 256, "M": 60, "N": 100, "iteration": 50, "k": 1, "beta": 0.5},
             sweep={"batch": 256}, extra={"gbps": 150.0}),
        _row("model", "auto", 0.25, 0.5,
             shape={"task": "itm", "B": 64, "config": "uniter-base", "layers": 12, "hidden": 768,
                    "precision": "bf16-autocast"},
             extra={"tokens_per_s": 34567.0, "peak_mem_bytes": 3 * 2**30}),
    ],
}


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def _older():
    d = copy.deepcopy(SAMPLE)
    d["created"] = "2026-11-01T09:00:00"
    d["results"] = [_row("ipot", "cuda", 1.0, 7.0,
                         shape={"B": 999, "M": 60, "N": 100, "iteration": 50})]
    return d


def _cpu():
    d = copy.deepcopy(SAMPLE)
    d["created"] = "2026-11-27T12:00:00"
    d["env"] = {"device_type": "cpu", "card": None, "cpu_model": "AMD EPYC", "threads": 2,
                "device_name": "CPU AMD EPYC (2 threads)", "smoke": False}
    d["results"] = [_row("ipot", "cpp", 2e-3, 9e-3,
                         shape={"B": 32, "M": 60, "N": 100, "iteration": 50},
                         extra={"gbps": 10.0})]
    return d


def _table_rows(text):
    return [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| Benchmark")]


def test_table_rows_come_from_headline_fast_backends(tmp_path):
    docs = [report.load(_write(tmp_path, n, d)) for n, d in
            (("new.json", SAMPLE), ("cpu.json", _cpu()))]
    text = report.table(docs)
    rows = _table_rows(text)
    # SAMPLE: triton fwd, sdpa fwd, triton fwd+bwd, ipot cuda, model auto; CPU file: ipot cpp
    assert len(rows) == 6
    assert not any("| reference |" in r for r in rows)      # baselines are not rows
    assert not any("B=32 H=12" in r for r in rows)          # non-headline sweep point
    for r in rows[:5]:
        assert r.endswith(f"| {H100} | 2026-11-20 |")
    assert rows[5].endswith("| CPU AMD EPYC (2 threads) | 2026-11-27 |")  # GPU rows first
    # model first, then attention fwd, fwd+bwd, then ipot
    assert rows[0].startswith("| model step itm | uniter-base")
    assert "| auto | 250.00 ms | 500.00 ms | **2.00×** |" in rows[0]
    assert "34.6 ktok/s" in rows[0] and "3.00 GiB peak" in rows[0]
    triton_fwd = [r for r in rows if r.startswith("| attention fwd |") and "| triton |" in r]
    assert len(triton_fwd) == 1
    assert ("| 1.20 ms | 3.00 ms | **2.50×** (1.25× vs sdpa) | 1.5e+03 GB/s (50% of peak) |"
            in triton_fwd[0])
    slower = [r for r in rows if r.startswith("| attention fwd+bwd |")][0]
    assert "**0.50×**" in slower                            # slow-downs are shown as such
    ipot = [r for r in rows if r.startswith("| ipot")][0]
    assert "B=256 60×100 it=50" in ipot and "80.0 µs" in ipot and "**100.00×**" in ipot
    assert "150 GB/s (5% of peak)" in ipot
    cpu = rows[5]
    assert "| 10 GB/s |" in cpu                                     # no datasheet for CPUs
    assert "new.json, cpu.json" not in text and "from cpu.json, new.json." in text


def _itr_row(pairs_s, ref_pairs_s, loop_pairs_s):
    pairs = 24 * 48
    shape = {"texts": 24, "images": 48, "txt_len": [8, 30], "num_bb": [10, 36], "img_dim": 2048,
             "mini_batch": 24, "config": "uniter-tiny", "layers": 2, "hidden": 64,
             "precision": "fp32"}
    r = _row("itr_eval", "auto", pairs / pairs_s, pairs / ref_pairs_s, shape=shape,
             others={"loop+auto": pairs / loop_pairs_s},
             extra={"pairs": pairs, "pairs_per_s": float(pairs_s),
                    "baseline_pairs_per_s": {"reference": float(ref_pairs_s),
                                             "loop+auto": float(loop_pairs_s)}})
    r["dtype"] = "float32"
    return r


def test_rows_are_merged_across_the_files_of_a_device(tmp_path):
    """Re-running one benchmark replaces only its own rows: per (device, row key) the newest
    file's row, other rows from older files kept; the footnote names every contributing file."""
    ipot_old = _cpu()                                            # 11-27: ipot B=32 + B=256
    ipot_old["results"].append(_row("ipot", "cpp", 20e-3, 100e-3,
                                    shape={"B": 256, "M": 60, "N": 100, "iteration": 50}))
    ipot_new = _cpu()                                            # 11-28: ipot B=32 again
    ipot_new["created"] = "2026-11-28T08:00:00"
    ipot_new["results"][0]["median_s"] = 1e-3                    # 9.00× instead of 4.50×
    ipot_new["results"][0]["speedup"]["reference"] = 9.0
    itr = _cpu()                                                 # 11-29: only the ITR benchmark
    itr["created"] = "2026-11-29T10:00:00"
    itr["results"] = [_itr_row(1200.0, 240.0, 300.0)]
    gpu_old = _older()                                           # H100 11-01: ipot B=999 only
    gpu_same_key = copy.deepcopy(SAMPLE["results"][5])           # H100 11-01: ipot B=256, slower
    gpu_same_key["median_s"], gpu_same_key["speedup"]["reference"] = 4e-3, 2.0
    gpu_old["results"].append(gpu_same_key)
    named = [("b_itr.json", itr), ("c_ipot_new.json", ipot_new), ("a_ipot_old.json", ipot_old),
             ("new.json", SAMPLE), ("old.json", gpu_old)]
    docs = [report.load(_write(tmp_path, n, d)) for n, d in named]
    text = report.table(docs)
    assert report.table(list(reversed(docs))) == text           # independent of file order
    rows = _table_rows(text)
    cpu = [r for r in rows if "| CPU AMD EPYC (2 threads) |" in r]
    assert len(cpu) == 3                                          # itr + ipot B=32 + ipot B=256
    assert cpu[0].startswith("| retrieval eval, full ranking")   # OP_ORDER: itr before ipot
    assert cpu[0].endswith("| 2026-11-29 |")
    b32 = [r for r in cpu if "| B=32 60×100" in r]
    assert len(b32) == 1 and "**9.00×**" in b32[0] and b32[0].endswith("| 2026-11-28 |")
    b256 = [r for r in cpu if "| B=256 60×100" in r]
    assert len(b256) == 1 and "**5.00×**" in b256[0] and b256[0].endswith("| 2026-11-27 |")
    gpu = [r for r in rows if f"| {H100} |" in r]
    assert len(gpu) == 6                                          # SAMPLE's 5 + the B=999 row
    ipot = [r for r in gpu if r.startswith("| ipot")]
    assert [("B=256" in r, "B=999" in r) for r in ipot] == [(True, False), (False, True)]
    assert "**100.00×**" in ipot[0] and ipot[0].endswith("| 2026-11-20 |")   # newer file wins
    assert "**2.00×**" not in ipot[0] and ipot[1].endswith("| 2026-11-01 |")
    assert ("from a_ipot_old.json, b_itr.json, c_ipot_new.json, new.json, old.json."
            in text)
    # a file whose every row has been replaced is not named
    ipot_old["results"] = ipot_old["results"][:1]
    docs[2] = report.load(_write(tmp_path, "a_ipot_old.json", ipot_old))
    text = report.table(docs)
    assert "a_ipot_old.json" not in text and "from b_itr.json, c_ipot_new.json," in text


def test_itr_eval_row_shows_pairs_per_second_and_the_original_loop(tmp_path):
    d = _cpu()
    d["results"] = [_itr_row(1200.0, 240.0, 300.0)]
    rows = _table_rows(report.table([report.load(_write(tmp_path, "i.json", d))]))
    assert len(rows) == 1
    assert rows[0].startswith(
        "| retrieval eval, full ranking: fast scorer vs the original per-caption loop | "
        "uniter-tiny (2 layers, hidden 64), 24 captions × 48 images = 1152 pairs, fp32 | auto | "
        "960.00 ms | 4.80 s | **5.00×** (4.00× vs the loop on fast ops) | "
        "1.2 kpairs/s vs 240 pairs/s (original loop, reference ops), "
        "300 pairs/s (the loop on fast ops) |")


def test_doc_markers_rewritten_in_place(tmp_path):
    page = tmp_path / "performance.md"
    before = "# Title\n\nintro\n\n"
    after = "\n\n## Later\ntext\n"
    page.write_text(before + report.BEGIN + "\nstale | table\n" + report.END + after)
    doc = report.load(_write(tmp_path, "r.json", SAMPLE))
    report.write_doc(str(page), report.table([doc]))
    once = page.read_text()
    assert once.startswith(before + report.BEGIN + "\n| Benchmark |")
    assert once.endswith(report.END + after)
    assert "stale" not in once and "**2.50×**" in once
    assert f"report.py --doc {report.DOC}`" in once
    report.write_doc(str(page), report.table([doc]))
    assert page.read_text() == once                           # idempotent
    assert report.write_readme is report.write_doc            # the old name


def test_doc_without_markers_is_refused(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("# no markers here\n")
    with pytest.raises(ValueError, match="perf-table"):
        report.write_doc(str(page), "| x |\n")
    assert page.read_text() == "# no markers here\n"


def test_published_page_holds_the_markers():
    """The table lives in docs/performance.md (report.DOC), between the markers, in order."""
    with open(os.path.join(ROOT, report.DOC), encoding="utf-8") as f:
        text = f.read()
    i, j = text.find(report.BEGIN), text.find(report.END)
    assert 0 <= i < j, report.DOC


def test_sweep_series_and_plots(tmp_path):
    doc = report.load(_write(tmp_path, "r.json", SAMPLE))
    series = report.sweep_series(doc, "attention")
    assert set(series) == {("batch", "fwd"), ("seq", "fwd"), ("batch", "fwd+bwd")}
    assert series[("batch", "fwd")]["triton"] == [(32.0, pytest.approx(1.6)),
                                                  (128.0, pytest.approx(2.5))]
    assert "reference" not in series[("batch", "fwd")]      # no ratio of its own
    paths = report.plot(doc, str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["r_attention.png", "r_ipot.png"]          # model has no sweep
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000


def test_cli_writes_table_and_skips_smoke_runs(tmp_path, capsys):
    smoke = copy.deepcopy(SAMPLE)
    smoke["env"]["smoke"] = True
    smoke["created"] = "2026-12-31T00:00:00"                 # newer, but a smoke run
    smoke["results"][0]["speedup"]["reference"] = 99.0
    files = [_write(tmp_path, "real.json", SAMPLE), _write(tmp_path, "smoke.json", smoke)]
    page = tmp_path / "performance.md"
    page.write_text(f"x\n{report.BEGIN}\n{report.END}\n")
    rc = report.main(files + ["--no-plots", "--doc", str(page),
                              "--table-out", str(tmp_path / "t.md")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "**2.50×**" in out and "99.00×" not in out
    assert (tmp_path / "t.md").read_text() in page.read_text()
    old = tmp_path / "README.md"                              # --readme: the old name of --doc
    old.write_text(f"y\n{report.BEGIN}\n{report.END}\n")
    assert report.main([files[0], "--no-plots", "--readme", str(old)]) == 0
    assert (tmp_path / "t.md").read_text() in old.read_text()
    assert report.main([files[1], "--no-plots"]) == 1        # nothing usable
    assert report.main([files[1], "--no-plots", "--include-smoke"]) == 0
    assert "99.00×" in capsys.readouterr().out


def test_malformed_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="env, results"):
        report.load(_write(tmp_path, "a.json", {"results": []}))
    bad = copy.deepcopy(SAMPLE)
    del bad["results"][0]["median_s"]
    with pytest.raises(ValueError, match="median_s"):
        report.load(_write(tmp_path, "b.json", bad))
    empty = copy.deepcopy(SAMPLE)
    empty["results"] = [r for r in empty["results"] if r["backend"] == "reference"]
    with pytest.raises(ValueError, match="no headline results"):
        report.table([report.load(_write(tmp_path, "c.json", empty))])


def test_formatting():
    assert report.fmt_time(1.5) == "1.50 s"
    assert report.fmt_time(2.5e-3) == "2.50 ms"
    assert report.fmt_time(7.25e-6) == "7.2 µs"
    assert report.fmt_si(34567.0, "tok/s") == "34.6 ktok/s"
    assert report.fmt_si(12.0, "tok/s") == "12 tok/s"
    assert math.isclose(SAMPLE["results"][0]["speedup"]["reference"], 2.5)


def test_ipot_distance_rows_follow_the_plan_rows_with_the_original_baseline(tmp_path):
    d = _cpu()
    shape = {"B": 256, "M": 60, "N": 100, "iteration": 50, "k": 1, "beta": 0.5}
    d["results"] = [
        _row("ipot_distance", "cpp", 2e-3, 60e-3, shape=shape, others={"original": 80e-3}),
        _row("ipot_distance", "reference", 60e-3, shape=shape, others={"original": 80e-3}),
        _row("ipot", "cpp", 1.5e-3, 55e-3, shape=shape),
    ]
    rows = [l for l in report.table([report.load(_write(tmp_path, "d.json", d))]).splitlines()
            if l.startswith("| ") and not l.startswith("| Benchmark")]
    assert len(rows) == 2 and rows[0].startswith("| ipot (WRA plan) |")
    assert rows[1].startswith("| ipot + trace(C·T) (WRA distance) | B=256 60×100 it=50")
    assert "| cpp | 2.00 ms | 60.00 ms | **30.00×** (40.00× vs original) |" in rows[1]


def test_wra_end_to_end_rows_name_mode_hidden_size_and_the_original(tmp_path):
    d = _cpu()
    shape = {"B": 256, "M": 60, "N": 100, "D": 768, "iteration": 50, "k": 1, "beta": 0.5}
    d["results"] = [
        _row("optimal_transport_dist", "cpp", 20e-3, 230e-3, shape=shape,
             others={"original": 240e-3}),
        _row("optimal_transport_dist", "cpp", 60e-3, 330e-3, mode="fwd+bwd", shape=shape,
             others={"original": 360e-3}),
        _row("ipot_distance", "cpp", 2e-3, 60e-3, shape=dict(shape, D=None),
             others={"original": 61e-3}),
    ]
    rows = [l for l in report.table([report.load(_write(tmp_path, "w.json", d))]).splitlines()
            if l.startswith("| ") and not l.startswith("| Benchmark")]
    assert len(rows) == 3 and rows[0].startswith("| ipot + trace(C·T)")   # after the distance
    assert rows[1].startswith("| WRA distance from embeddings fwd (cost + ipot + trace) | "
                              "B=256 60×100 D=768 it=50, bfloat16 | cpp | 20.00 ms | 230.00 ms | "
                              "**11.50×** (12.00× vs original) |")
    assert rows[2].startswith("| WRA distance from embeddings fwd+bwd")
    assert "(6.00× vs original)" in rows[2]
