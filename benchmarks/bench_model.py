"""Whole-model benchmark: one UNITER pretraining step (forward + backward,
gradients zeroed, no optimizer step) per task and for UNITER's task mix,
with the fast ops (``backend="auto"``) against the reference ops
(``uniter_fast.ops.use_backend("reference")``), same weights, same batch,
same precision (bf16 autocast on CUDA, fp32 on CPU) and same engine (eager
PyTorch).  Reports tokens/s (real, unpadded tokens) and, on CUDA, peak memory.

CUDA: UNITER-base, 64 examples, text 10..50 tokens, 10..100 regions
(about UNITER's 10240-token per-GPU batches).  CPU: a small 4-layer config.
"""
import contextlib
import functools

import benchutil as bu
import pytest
import synthetic_batches as bb
import torch

import uniter_fast
from uniter_fast import ops

ITM_OT_LAMBDA = 0.1  # UNITER's pretraining config

if bu.SMOKE:
    CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    B, TXT, NBB, IMG_DIM, LABEL_DIM = 2, (3, 6), (2, 5), 16, 8
elif bu.ON_CUDA:
    CONFIG = "uniter-base"
    B, TXT, NBB, IMG_DIM, LABEL_DIM = 64, (10, 50), (10, 100), 2048, 1601
else:
    CONFIG = dict(vocab_size=28996, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, max_position_embeddings=512)
    B, TXT, NBB, IMG_DIM, LABEL_DIM = 8, (8, 30), (10, 36), 2048, 1601

AUTOCAST = torch.bfloat16 if bu.ON_CUDA else None
ENGINES = ("auto", "reference")
CASES = bb.TASKS + ("mixed",)


@functools.lru_cache(maxsize=None)
def model():
    torch.manual_seed(0)
    cfg = (uniter_fast.UniterConfig.from_pretrained_name(CONFIG) if isinstance(CONFIG, str)
           else uniter_fast.UniterConfig(**CONFIG))
    m = uniter_fast.UniterForPretraining(cfg, IMG_DIM, LABEL_DIM).to(bu.DEVICE)
    return m.train()


@functools.lru_cache(maxsize=None)
def batch(task):
    cfg = model().config
    return bb.make_batch(task, B, TXT, NBB, vocab_size=cfg.vocab_size, img_dim=IMG_DIM,
                         img_label_dim=LABEL_DIM, seed=bb.TASKS.index(task), device=bu.DEVICE)


def _engine(engine):
    return contextlib.nullcontext() if engine == "auto" else ops.use_backend(engine)


def _autocast():
    if AUTOCAST is None:
        return contextlib.nullcontext()
    return torch.autocast(bu.DEVICE.type, dtype=AUTOCAST)


def _loss(m, task):
    out = m(batch(task), task)
    if task == "itm":
        itm_loss, ot = out
        return uniter_fast.itm_ot_loss(itm_loss, ot, ITM_OT_LAMBDA)
    return out.mean()


def step_fn(case, engine):
    """One training step of ``case`` (a task, or "mixed": UNITER's mix ratio
    itm:mlm:mrfr:mrc-kl = 2:2:1:1 as six consecutive steps)."""
    m = model()
    tasks = [t for t, w in bu.MIX_RATIO for _ in range(w)] if case == "mixed" else [case]

    def run():
        with _engine(engine):
            for task in tasks:
                m.zero_grad(set_to_none=True)
                with _autocast():
                    loss = _loss(m, task)
                loss.backward()
        return loss
    return run, sum(bb.real_tokens(batch(t)) for t in tasks)


def _check_engines_agree(case):
    """Fast and reference ops must give the same losses (eval: no dropout)."""
    m = model()
    tasks = [t for t, _ in bu.MIX_RATIO] if case == "mixed" else [case]
    m.eval()
    try:
        with torch.no_grad(), _autocast():
            for task in tasks:
                got = {e: _engine_loss(m, task, e) for e in ENGINES}
                tol = 5e-2 if AUTOCAST is not None else 1e-4
                torch.testing.assert_close(got["auto"], got["reference"], rtol=tol, atol=tol)
    finally:
        m.train()


def _engine_loss(m, task, engine):
    with _engine(engine):
        return _loss(m, task).float()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_model_step(benchmark, collector, case, engine):
    try:
        model()
    except (AttributeError, ImportError) as e:  # the model package is missing
        pytest.skip(f"uniter_fast.UniterForPretraining unavailable: {e}")
    if engine == "auto":
        _check_engines_agree(case)
    precision = "bf16-autocast" if AUTOCAST is not None else "fp32"
    benchmark.group = f"model step {case} B={B} {precision} {bu.DEVICE.type}"
    fast, tokens = step_fn(case, engine)
    baselines = {} if engine == "reference" else {"reference": step_fn(case, "reference")[0]}
    timing = bu.measure(benchmark, fast, baselines, min_rounds=3,
                        max_rounds=30 if bu.ON_CUDA else 5)
    cfg = model().config
    rec = bu.make_record(
        op="model", group=benchmark.group, mode="fwd+bwd", backend=engine,
        dtype=AUTOCAST or torch.float32,
        shape={"task": case, "B": B, "txt_len": list(TXT), "num_bb": list(NBB),
               "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
               "heads": cfg.num_attention_heads, "config": CONFIG if isinstance(CONFIG, str)
               else "small", "precision": precision,
               "validate_inputs": bool(getattr(model(), "validate_inputs", False))},
        timing=timing, headline=True, tokens=tokens,
        peak_mem_bytes=bu.cuda_peak_bytes(fast),
        notes="forward+backward+zero_grad per task; mixed = itm,itm,mlm,mlm,mrfr,mrc-kl")
    bu.attach(benchmark, rec)
    collector.add(rec)
