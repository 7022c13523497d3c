"""Whole training step (forward + backward, gradients zeroed, no optimizer step) at
UNITER-base shape, four columns measured in the same run on the same batches:

* ``reference``: UNITER's own computation, eager PyTorch: every op on its reference twin
  (``ops.use_backend("reference")``) and every row of the last layer computed before the
  heads select theirs (``UniterEncoder.prune_last_layer = False``);
* ``reference+compile``: the same under ``torch.compile`` (``uniter_fast.compile_model``,
  inductor): what the original gets from one line of torch.compile;
* ``fast``: the default ops ("auto") and the last layer on the rows the heads read only
  (MLM: the masked words, MRM: the masked regions, VQA: [CLS]; ITM + WRA reads them all),
  eager;
* ``fast+compile``: the default ops under ``torch.compile`` (what ``--compile`` runs).

Cases: each pretraining task (mlm, mrfr, mrc-kl, itm + WRA), UNITER's 2:2:1:1 mix
(itm, itm, mlm, mlm, mrfr, mrc-kl as six consecutive steps) and a VQA fine-tuning step.
Batches come from the real token-bucket sampler (``uniter_fast.data.sampler``) and the real
collate functions over examples with text 10-40 tokens and 10-100 regions (the lengths of
UNITER's data): ``N_BATCHES`` different batches per task, every column warmed up on each
(compilation happens there, untimed), then timed round by round, interleaved, all columns
on the same batch in a round.

Per column: median step time, tokens/s (real tokens of the batches / median), peak memory
(CUDA: allocated; CPU: the process's RSS during one step), graph breaks of the forward
(``torch._dynamo.explain``), and achieved FLOP/s: UNITER's FLOPs for the step (the
reference step as executed on the padded batch, ``torch.utils.flop_counter``: matmuls,
attention, forward and backward) over the median time, and the column's own executed FLOPs
(fewer on the fast ops: the pruned rows) over it, against an fp32 GEMM rate measured in the
same run (the best of a few 2048³ products): on a CPU the physical limit of a GEMM-bound
step.  On CPU every column runs with freed memory kept (``keep_freed_memory``, what the
trainer sets; a process setting); ``test_cpu_allocator`` measures it first against glibc's
default malloc.

CPU: UNITER-base (12 layers, hidden 768), fp32, batches of at most ``BATCH_TOKENS`` = 320
padded tokens (2-9 examples; about 2 s per step on one thread, the published setting on a
shared VM: ``UNITER_FAST_BENCH_THREADS=1``; a reduced batch, UNITER's is ~10k tokens per
GPU).  CUDA: UNITER-base, bf16 autocast, 10240-token batches.  Smoke mode:
a tiny model, tiny batches, no compiled columns under ``UNITER_FAST_BENCH_COMPILE=0``.

``python benchmarks/bench_step.py RESULTS.json`` prints the markdown table of a results file.
"""
import contextlib
import copy
import functools
import json
import os
import random
import sys
import threading
import time

import benchutil as bu
import pytest
import torch

import uniter_fast
from uniter_fast import ops
from uniter_fast.constants import BUCKET_SIZE
from uniter_fast.data.collate import itm_ot_collate, mlm_collate, mrc_collate, mrfr_collate
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.vqa import vqa_collate
from uniter_fast.masking import img_mask_target, random_word, region_mask
from uniter_fast.model import UniterForVisualQuestionAnswering, vqa_train_loss
from uniter_fast.model.compile import compile_counts, compile_model, dynamo_config
from uniter_fast.training.allocator import allocator_state, keep_freed_memory

ITM_OT_LAMBDA = 0.1          # UNITER's pretraining config
MASK_PROB = 0.15
N_BATCHES = 3
TXT, NBB = (10, 40), (10, 100)
if bu.SMOKE:
    CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    IMG_DIM, LABEL_DIM, NUM_ANSWER = 16, 8, 10
    TXT, NBB = (3, 8), (2, 10)
    BATCH_TOKENS, SIZE_MULTIPLE, N_EXAMPLES = 48, 1, 48
elif bu.ON_CUDA:
    CONFIG = "uniter-base"
    IMG_DIM, LABEL_DIM, NUM_ANSWER = 2048, 1601, 3129
    BATCH_TOKENS, SIZE_MULTIPLE, N_EXAMPLES = 10240, 8, 4096
else:
    CONFIG = "uniter-base"
    IMG_DIM, LABEL_DIM, NUM_ANSWER = 2048, 1601, 3129
    BATCH_TOKENS, SIZE_MULTIPLE, N_EXAMPLES = 320, 1, 512
AUTOCAST = torch.bfloat16 if bu.ON_CUDA else None
TASKS = ("mlm", "mrfr", "mrc-kl", "itm")
CASES = TASKS + ("mixed", "vqa")
MIX = [t for t, w in bu.MIX_RATIO for _ in range(w)]          # itm, itm, mlm, mlm, mrfr, mrc-kl
COLUMNS = ("reference", "reference+compile", "fast", "fast+compile")


def columns():
    """The columns this run measures (the compiled ones unless UNITER_FAST_BENCH_COMPILE=0)."""
    return tuple(c for c in COLUMNS if bu.WITH_COMPILE or "compile" not in c)


# ----------------------------------------------------------------- batches from the sampler

def _examples(task, vocab, seed):
    """``N_EXAMPLES`` examples of ``task`` as UNITER's datasets give them (lengths uniform in
    TXT and NBB: [CLS] text [SEP] and the regions)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_EXAMPLES):
        tl, nbb = rng.randint(*TXT), rng.randint(*NBB)
        words = [rng.randrange(999, vocab) if vocab > 1000 else rng.randrange(5, vocab)
                 for _ in range(tl - 2)]
        feat = torch.rand(nbb, IMG_DIM, generator=g) * 4            # ReLU-like features
        box = torch.rand(nbb, 6, generator=g)
        ex = {"img_feat": feat, "img_pos_feat": torch.cat([box, box[:, 4:5] * box[:, 5:6]], 1),
              "attn_masks": torch.ones(tl + nbb, dtype=torch.long)}
        cls_, sep = (101, 102) if vocab > 1000 else (1, 2)
        if task == "mlm":
            words, labels = random_word(words, (999 if vocab > 1000 else 5, vocab),
                                        103 if vocab > 1000 else 3, rng, MASK_PROB)
            ex["txt_labels"] = torch.tensor([-1] + labels + [-1])
        elif task in ("mrfr", "mrc-kl"):
            ex["img_mask"] = region_mask(nbb, MASK_PROB, rng)
            ex["img_mask_tgt"] = img_mask_target(ex["img_mask"], tl)
            if task == "mrc-kl":
                ex["img_soft_label"] = torch.softmax(
                    torch.randn(nbb, LABEL_DIM, generator=g) * 3, -1)
        elif task == "itm":
            ex["target"] = torch.tensor([rng.randint(0, 1)])
        else:   # vqa: soft scores of a few answers
            t = torch.zeros(NUM_ANSWER)
            t[torch.randint(0, NUM_ANSWER, (3,), generator=g)] = torch.rand(3, generator=g)
            ex["targets"] = t
        ex["input_ids"] = torch.tensor([cls_] + words + [sep])
        out.append(ex)
    return out


COLLATE = {"mlm": mlm_collate, "mrfr": mrfr_collate, "mrc-kl": mrc_collate,
           "itm": itm_ot_collate, "vqa": vqa_collate}


@functools.lru_cache(maxsize=None)
def batches(task):
    """``N_BATCHES`` batches of ``task``: the first batches of the token-bucket sampler
    (BUCKET_SIZE buckets, at most BATCH_TOKENS padded tokens) over the examples."""
    vocab = config().vocab_size
    exs = _examples(task, vocab, seed=(TASKS + ("vqa",)).index(task))
    lens = [int(x["attn_masks"].numel()) for x in exs]
    sampler = TokenBucketSampler(BUCKET_SIZE, BATCH_TOKENS, size_multiple=SIZE_MULTIPLE, seed=0)
    out = []
    for idx in sampler.batches(lens, epoch=0)[:N_BATCHES]:
        b = COLLATE[task]([exs[i] for i in idx])
        out.append(_to_device(b))
    return out


def _to_device(v):
    if torch.is_tensor(v):
        return v.to(bu.DEVICE)
    if isinstance(v, dict):
        return {k: _to_device(x) for k, x in v.items()}
    return v


def real_tokens(batch):
    return int(batch["attn_masks"].sum())


def padded_tokens(batch):
    return int(batch["attn_masks"].numel())


# ----------------------------------------------------------------- models and steps

@functools.lru_cache(maxsize=None)
def config():
    return (uniter_fast.UniterConfig.from_pretrained_name(CONFIG) if isinstance(CONFIG, str)
            else uniter_fast.UniterConfig(**CONFIG))


@functools.lru_cache(maxsize=None)
def models(kind):
    """(eager model, compiled copy) of ``kind`` ("pretrain" or "vqa"), same weights, train
    mode with dropout off (the columns must compute the same numbers)."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(config())
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    if kind == "pretrain":
        m = uniter_fast.UniterForPretraining(cfg, IMG_DIM, LABEL_DIM)
    else:
        m = UniterForVisualQuestionAnswering(cfg, IMG_DIM, NUM_ANSWER)
    m = m.to(bu.DEVICE).train()
    compiled = compile_model(copy.deepcopy(m)) if bu.WITH_COMPILE else None
    return m, compiled


def _model(column, kind):
    eager, compiled = models(kind)
    return compiled if column.endswith("+compile") else eager


def _engine(column):
    return ops.use_backend("reference") if column.startswith("reference") \
        else contextlib.nullcontext()


def _autocast():
    return (torch.autocast(bu.DEVICE.type, dtype=AUTOCAST) if AUTOCAST is not None
            else contextlib.nullcontext())


def _loss(model, task, batch):
    if task == "vqa":
        return vqa_train_loss(model(batch))
    out = model(batch, task)
    if task == "itm":
        return uniter_fast.itm_ot_loss(*out, ITM_OT_LAMBDA)
    return out.mean()


def _tasks(case):
    return MIX if case == "mixed" else [case]


def _prune(model, column):
    """The reference columns compute UNITER's way (every row of the last layer, then the
    heads' selection); the fast ones only the rows the heads read."""
    model.uniter.encoder.prune_last_layer = not column.startswith("reference")


def step(column, case, i, *, ops_of=None):
    """One step of ``case`` (the mix: six) on batch ``i`` of each task, in ``column``
    (``ops_of``: run on that column's ops instead, the column's computation otherwise)."""
    kind = "vqa" if case == "vqa" else "pretrain"
    model = _model(column, kind)
    _prune(model, column)
    loss = None
    with _engine(ops_of or column):
        for task in _tasks(case):
            model.zero_grad(set_to_none=True)
            with _autocast():
                loss = _loss(model, task, batches(task)[i % N_BATCHES])
            loss.backward()
    return loss


def rotating(column, case):
    """A callable running the next batch in rotation at each call."""
    state = {"i": 0}

    def run():
        step(column, case, state["i"])
        state["i"] += 1
    return run


# ----------------------------------------------------------------- measurements

def gemm_rate(dtype=torch.float32):
    """fp32 GEMM FLOP/s on this device: the best of a few 2048³ products."""
    n = 256 if bu.SMOKE else 2048
    a = torch.randn(n, n, device=bu.DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=bu.DEVICE, dtype=dtype)
    torch.mm(a, b)
    best = min(bu.time_call(lambda: torch.mm(a, b)) for _ in range(3 if bu.SMOKE else 8))
    return 2.0 * n ** 3 / best


def step_flops(case, i, column="reference"):
    """FLOPs of the ``column``'s step on batch ``i`` as executed (padded batch; matmuls and
    attention, forward and backward), counted on the reference ops (the counter does not
    see inside the C++ kernels): the reference's are UNITER's FLOPs; the fast columns
    execute fewer (the last layer's pruned rows)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step(column.split("+")[0], case, i, ops_of="reference")
    return int(counter.get_total_flops())


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn):
    """Peak memory of one call: CUDA allocated bytes, else the process's RSS (sampled every
    2 ms; includes the weights, optimizer-free)."""
    if bu.ON_CUDA:
        return bu.cuda_peak_bytes(fn)
    peak, done = [_rss_bytes()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_bytes())


@functools.lru_cache(maxsize=None)
def _forward_breaks():
    """{(ops, task): graph breaks of the forward} by ``torch._dynamo.explain``, for every task
    on the reference and on the fast ops: computed once, before anything is compiled (explain
    resets dynamo, which would drop the compiled columns' graphs)."""
    out = {}
    for ops_name in ("reference", "fast"):
        with _engine(ops_name):
            # smoke: one explain (the code path), the other counts unknown
            for task in ("mlm",) if bu.SMOKE and ops_name == "fast" else () if bu.SMOKE \
                    else TASKS + ("vqa",):
                eager, _ = models("vqa" if task == "vqa" else "pretrain")
                b = batches(task)[0]
                args = (b,) if task == "vqa" else (b, task)
                eager.validate(*args)
                torch._dynamo.reset()
                with dynamo_config():
                    out[ops_name, task] = torch._dynamo.explain(eager.forward)(
                        *args).graph_break_count
    torch._dynamo.reset()
    return out


def graph_breaks(column, case):
    """Graph breaks of the forward(s) of ``case`` on the column's ops."""
    ops_name = column.split("+")[0]
    counts = [_forward_breaks().get((ops_name, t)) for t in dict.fromkeys(_tasks(case))]
    return None if None in counts else sum(counts)


@functools.lru_cache(maxsize=None)
def _gemm():
    return gemm_rate()


def _same_losses(case):
    """The four columns compute the same losses on the first batch (fp32: to rounding)."""
    losses = {c: float(step(c, case, 0).detach()) for c in columns()}
    ref = losses["reference"]
    tol = 5e-2 if AUTOCAST is not None else 1e-3
    for c, v in losses.items():
        assert abs(v - ref) <= tol * max(1.0, abs(ref)), losses
    return losses


ALLOCATOR_CASES = ("mlm", "itm")


@pytest.mark.skipif(bu.ON_CUDA, reason="a CPU allocator setting")
def test_cpu_allocator(benchmark, collector):
    """The fast eager step of ``ALLOCATOR_CASES`` with glibc's default malloc, then with
    freed memory kept (``uniter_fast.training.allocator.keep_freed_memory``: what the trainer
    sets on CPU).  Sequential in one process, every case on the default first (the setting
    cannot be undone), before the step rows, which all run with it (every column: it is a
    process setting, UNITER's code gets it too)."""
    if allocator_state() == "kept":
        pytest.skip("freed memory is already kept in this process (run this file alone)")
    rounds = 1 if bu.SMOKE else 2 * N_BATCHES
    fns = {case: rotating("fast", case) for case in ALLOCATOR_CASES}
    samples = {}
    for setting in ("default", "kept"):
        if setting == "kept" and not keep_freed_memory(True):
            pytest.skip("glibc's mallopt is not available here")
        for case, fn in fns.items():
            for _ in range(N_BATCHES):          # warm-up: the heap grows to the step's peak
                fn()
            samples[setting, case] = got = []
            if setting == "kept" and case == ALLOCATOR_CASES[0]:
                benchmark.group = "cpu allocator"
                benchmark.pedantic(lambda fn=fn: got.append(bu.time_call(fn)), rounds=rounds,
                                   iterations=1, warmup_rounds=0)
            else:
                got.extend(bu.time_call(fn) for _ in range(rounds))
    for case in ALLOCATOR_CASES:
        kept, default = bu._stats(samples["kept", case]), bu._stats(samples["default", case])
        timing = dict(kept, baselines={"glibc-default": default},
                      speedup={"glibc-default": default["median_s"] / kept["median_s"]})
        rec = bu.make_record(
            op="allocator", group=f"cpu allocator {case}", mode="fwd+bwd", backend="fast",
            dtype=torch.float32,
            shape={"task": case, "config": CONFIG if isinstance(CONFIG, str) else "smoke",
                   "batch_tokens": BATCH_TOKENS},
            timing=timing, notes="fast ops eager; glibc-default rounds first, then "
                                 "keep_freed_memory() and the same batches (sequential)")
        if case == ALLOCATOR_CASES[0]:
            bu.attach(benchmark, rec)
        collector.add(rec)


@pytest.mark.parametrize("case", CASES)
def test_training_step(benchmark, collector, case):
    if not bu.ON_CUDA:
        keep_freed_memory(True)             # the trainer's CPU setting, for every column
    cols = columns()
    breaks = {c: graph_breaks(c, case) for c in cols}
    before = compile_counts()
    t0 = time.perf_counter()
    for c in cols:                      # warm-up: every column on every batch (compiles)
        for i in range(N_BATCHES):
            step(c, case, i)
    warm_s = time.perf_counter() - t0
    counts = {k: v - before[k] for k, v in compile_counts().items()}
    losses = _same_losses(case)
    main = cols[-1]
    fns = {c: rotating(c, case) for c in cols}
    benchmark.group = f"training step {case} {bu.DEVICE.type}"
    timing = bu.measure(benchmark, fns[main], {c: fns[c] for c in cols[:-1]}, warmup=1,
                        min_rounds=2 * N_BATCHES, max_rounds=2 * N_BATCHES)
    tasks = _tasks(case)
    per_batch = [{t: batches(t)[i] for t in tasks} for i in range(N_BATCHES)]
    tokens = sum(real_tokens(b[t]) for b in per_batch for t in tasks) / N_BATCHES
    padded = sum(padded_tokens(b[t]) for b in per_batch for t in tasks) / N_BATCHES
    executed = {o: sum(step_flops(case, i, o) for i in range(N_BATCHES)) / N_BATCHES
                for o in ("reference", "fast")}
    flops = executed["reference"]           # UNITER's FLOPs: what the reference executes
    rate = _gemm()
    medians = {main: timing["median_s"], **{c: timing["baselines"][c]["median_s"]
                                            for c in cols[:-1]}}
    col_rec = {}
    for c in cols:
        med = medians[c]
        col_rec[c] = {
            "median_s": med, "tokens_per_s": tokens / med,
            # UNITER's FLOPs (the reference step's) per second: the same work in every column
            "flops_per_s": flops / med, "fraction_of_gemm_rate": flops / med / rate,
            # the FLOPs this column executes per second (fast: fewer, the pruned rows)
            "executed_flops": executed[c.split("+")[0]],
            "executed_fraction_of_gemm_rate": executed[c.split("+")[0]] / med / rate,
            "peak_mem_bytes": peak_memory(lambda c=c: step(c, case, 0)),
            "graph_breaks": breaks[c],
            "loss": losses[c]}
    cfg = config()
    rec = bu.make_record(
        op="step", group=benchmark.group, mode="fwd+bwd", backend=main,
        dtype=AUTOCAST or torch.float32,
        shape={"task": case, "config": CONFIG if isinstance(CONFIG, str) else "smoke",
               "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
               "batch_tokens": BATCH_TOKENS, "size_multiple": SIZE_MULTIPLE,
               "txt_len": list(TXT), "num_bb": list(NBB), "batches": N_BATCHES,
               "examples": [[int(batches(t)[i]["input_ids"].size(0)) for t in tasks]
                            for i in range(N_BATCHES)],
               "precision": "bf16-autocast" if AUTOCAST is not None else "fp32"},
        timing=timing, headline=True, tokens=int(round(tokens)), flops=flops,
        peak_mem_bytes=col_rec[main]["peak_mem_bytes"] if bu.ON_CUDA else None,
        notes="forward+backward+zero_grad per task (mixed: itm,itm,mlm,mlm,mrfr,mrc-kl); "
              "batches from TokenBucketSampler + the real collates; columns interleaved")
    rec.update(columns=col_rec, gemm_fp32_flops_per_s=rate, padded_tokens=padded,
               warmup_s=warm_s, compile=counts, cpu_allocator=allocator_state())
    bu.attach(benchmark, rec)
    collector.add(rec)


# ----------------------------------------------------------------- the table

def table(doc):
    """Markdown table of the step records of a results document."""
    cols = COLUMNS
    rows = [r for r in doc["results"] if r["op"] == "step"]
    head = ("| step | " + " | ".join(f"{c} (ms, tok/s)" for c in cols)
            + " | fast+compile vs reference+compile | fast vs reference | "
            "GEMM fraction (fast+compile: UNITER's FLOPs, executed FLOPs) | "
            "peak RSS / memory (fast+compile) | graph breaks |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for r in sorted(rows, key=lambda r: CASES.index(r["shape"]["task"])):
        c = r["columns"]

        def cell(name):
            if name not in c:
                return "–"
            return f"{c[name]['median_s'] * 1e3:.0f}, {c[name]['tokens_per_s']:.0f}"

        def ratio(a, b):
            return f"**{c[b]['median_s'] / c[a]['median_s']:.2f}×**" if a in c and b in c \
                else "–"
        main = "fast+compile" if "fast+compile" in c else "fast"
        breaks = ", ".join(f"{k.split('+')[0]} {v['graph_breaks']}" for k, v in c.items()
                           if "+compile" not in k and v["graph_breaks"] is not None) or "–"
        lines.append(
            f"| {r['shape']['task']} | " + " | ".join(cell(n) for n in cols)
            + f" | {ratio('fast+compile', 'reference+compile')} | {ratio('fast', 'reference')}"
            f" | {100 * c[main]['fraction_of_gemm_rate']:.0f}%"
            + (f", {100 * c[main]['executed_fraction_of_gemm_rate']:.0f}%"
               if "executed_fraction_of_gemm_rate" in c[main] else "")
            + f" of {r['gemm_fp32_flops_per_s'] / 1e9:.0f} GFLOP/s"
            f" | {c[main]['peak_mem_bytes'] / 2**30:.2f} GiB | {breaks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
