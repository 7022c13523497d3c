"""torch.compile: every op and every model compiles without a graph break, and compiled
equals eager (values and gradients).

* ops: each op on each CPU backend (``torch._dynamo.explain`` reports 0 breaks; the op
  compiled with aot_eager equals the op run eagerly, forward and backward), every
  custom op passes ``torch.library.opcheck`` (schema, fake implementation, autograd
  registration), switching backends under a compiled function recompiles;
* models: every pretraining task (mlm, mrfr, mrc, mrc-kl, itm with WRA) and every
  fine-tuning model (VQA, VE, NLVR2 x3, retrieval, RE, VCR), on "auto" and on
  ``use_backend("reference")``: 0 breaks in the forward (explain), and the forward +
  backward compiled with aot_eager gives the eager losses and gradients (one task also
  with inductor: fp32 rounding);
* ``compile_model``: the batch checks still run (before the compiled call) with the
  eager errors, and the state-dict keys are unchanged.
"""

import contextlib
import copy

import pytest
import torch
from batches import make_batch

import uniter_fast
from uniter_fast import UniterConfig, UniterForPretraining, ops
from uniter_fast.model import (
    UniterForImageTextRetrieval,
    UniterForImageTextRetrievalHardNeg,
    UniterForPretrainingForVCR,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
)
from uniter_fast.model.compile import compile_counts, compile_model, dynamo_config
from uniter_fast.ops import _registry

CPU_BACKENDS = {op: [b for b in ops.available_backends(op, "cpu") if "triton" not in b]
                for op in ("attention", "layer_norm", "gelu", "cost_matrix_cosine", "ipot",
                           "ipot_distance", "optimal_transport_dist")}


def _inputs():
    g = torch.Generator().manual_seed(0)
    b, m, n, d = 3, 5, 7, 8
    t = dict(
        x=torch.randn(b, m, d, generator=g), y=torch.randn(b, n, d, generator=g),
        tp=torch.arange(m)[None] >= torch.tensor([5, 3, 0])[:, None],   # one empty text
        ip=torch.arange(n)[None] >= torch.tensor([7, 2, 6])[:, None],
        C=torch.rand(b, m, n, generator=g) * 2, q=torch.randn(2, 2, 6, 4, generator=g),
        w=torch.rand(d, generator=g) + 0.5, bias=torch.randn(d, generator=g))
    t["am"] = (torch.arange(6)[None] < torch.tensor([6, 4])[:, None]).long()
    return t


# (op, call on the inputs, which inputs are differentiated)
OP_CASES = {
    "attention": ("attention", lambda t, be: ops.attention(t["q"], t["q"] * 0.5, t["q"] + 1,
                                                           t["am"], backend=be), ["q"]),
    "layer_norm": ("layer_norm", lambda t, be: ops.layer_norm(t["x"], t["w"], t["bias"],
                                                              backend=be), ["x", "w", "bias"]),
    "gelu": ("gelu", lambda t, be: ops.gelu(t["x"], backend=be), ["x"]),
    "cost_matrix_cosine": ("cost_matrix_cosine", lambda t, be: ops.cost_matrix_cosine(
        t["x"], t["y"], txt_pad=t["tp"], img_pad=t["ip"], backend=be), ["x", "y"]),
    "ipot": ("ipot", lambda t, be: ops.ipot(t["C"], t["tp"], t["ip"], backend=be), []),
    "ipot_distance": ("ipot_distance", lambda t, be: ops.ipot_distance(
        t["C"], t["tp"], t["ip"], backend=be), ["C"]),
    # beta 0.05: the routing to the float64 log domain, inside the custom op
    "ipot_distance_small_beta": ("ipot_distance", lambda t, be: ops.ipot_distance(
        t["C"], t["tp"], t["ip"], beta=0.05, backend=be), ["C"]),
    "wra": ("optimal_transport_dist", lambda t, be: ops.optimal_transport_dist(
        t["x"], t["y"], t["tp"], t["ip"], backend=be), ["x", "y"]),
    "wra_small_beta": ("optimal_transport_dist", lambda t, be: ops.optimal_transport_dist(
        t["x"], t["y"], t["tp"], t["ip"], beta=0.05, backend=be), ["x", "y"]),
}
OP_PARAMS = [(case, be) for case, (op, _, _) in OP_CASES.items() for be in CPU_BACKENDS[op]]


def _run_op(case, be, compiled):
    _, call, grads = OP_CASES[case]
    t = _inputs()
    for k in grads:
        t[k].requires_grad_()
    fn = (lambda: call(t, be))
    if compiled:
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = fn()
    gs = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum(),
                             [t[k] for k in grads]) if grads else []
    return out.detach(), gs


@pytest.mark.parametrize("case,backend", OP_PARAMS)
def test_every_op_compiles_without_a_break_and_equals_eager(case, backend):
    _, call, _ = OP_CASES[case]
    t = _inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: call(t, backend).sum())()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    out, grads = _run_op(case, backend, compiled=False)
    out_c, grads_c = _run_op(case, backend, compiled=True)   # fullgraph: a break would raise
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    t = _inputs()
    C = t["C"].requires_grad_()
    x, y = t["x"].requires_grad_(), t["y"].requires_grad_()
    u = torch.ops.uniter_fast
    kernels = [b for b in CPU_BACKENDS["ipot"]]
    assert "reference" in kernels
    for be in kernels:
        torch.library.opcheck(u.ipot, (C.detach(), t["tp"], t["ip"], 0.5, 10, 1, be))
        for beta, route in ((0.5, False), (0.5, True), (0.05, True)):
            torch.library.opcheck(u.ipot_distance,
                                  (C, t["tp"], t["ip"], beta, 10, 1, be, True, route))
        torch.library.opcheck(u.ipot_distance, (C, t["tp"], t["ip"], 0.5, 10, 1, be, False, True),
                              test_utils=("test_schema", "test_faketensor"))
    if "cpp" in CPU_BACKENDS["optimal_transport_dist"]:
        for with_grad in (True, False):
            torch.library.opcheck(u.wra_cpp, (x, y, t["tp"], t["ip"], 0.5, 10, 1, with_grad),
                                  test_utils=("test_schema", "test_faketensor",
                                              "test_autograd_registration")
                                  + (("test_aot_dispatch_dynamic",) if with_grad else ()))
    d = torch.rand(3, requires_grad=True)
    torch.library.opcheck(u.wra_check_finite, (d, x, y, t["tp"], t["ip"], 0.5))


def test_the_finiteness_check_runs_in_the_compiled_graph():
    """A non-finite WRA distance from finite embeddings is a bug the op reports: also
    inside a compiled function (the check is an op of the graph, it reads no scalar in
    traced code); a non-finite embedding row passes its NaN through."""
    t = _inputs()
    check = torch.compile(lambda d, x: torch.ops.uniter_fast.wra_check_finite(
        d, x, t["y"], t["tp"], t["ip"], 0.5) * 2, backend="aot_eager", fullgraph=True)
    good = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(check(good, t["x"]), good * 2)
    bad = torch.tensor([1.0, float("nan"), 3.0])
    with pytest.raises(ValueError, match="non-finite result from a finite input"):
        check(bad, t["x"])
    x = t["x"].clone()
    x[1, 0, 0] = float("nan")            # a real row of example 1: NaN is the right answer
    assert torch.isnan(check(bad, x)[1])


@pytest.fixture
def toy_op():
    _registry.register("toy", "plus", lambda: (lambda x: x + 1), priority=10)
    _registry.register("toy", "times", lambda: (lambda x: x * 5), priority=0)
    yield
    _registry.unregister("toy")


def test_switching_backends_under_compile_recompiles(toy_op):
    """The registry runs at trace time: use_backend's selection is guarded, so a compiled
    function follows it (a stale choice would be a silent wrong answer)."""
    fn = torch.compile(lambda x: _registry.resolve("toy", None, x.device, x.dtype)(x),
                       backend="eager", fullgraph=True)
    x = torch.ones(3)
    assert fn(x).tolist() == [2.0] * 3
    with ops.use_backend("times"):
        assert fn(x).tolist() == [5.0] * 3
    assert fn(x).tolist() == [2.0] * 3


# ----------------------------------------------------------------- models

PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrc-kl", "itm")
TXT, NBB = [5, 7, 3, 6], [4, 6, 2, 5]


def _pretrain_case(task):
    torch.manual_seed(0)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    model = UniterForPretraining(cfg, 32, 10).eval()
    batch = make_batch(task, cfg.vocab_size, 32, 10, TXT, NBB,
                       gen=torch.Generator().manual_seed(1))
    return model, (batch, task), {}


def _finetune_cases():
    """name -> () -> (model, args, kwargs): every fine-tuning model on a batch of its
    own layout (the batches of the models' tests)."""
    import test_itr_re_vcr_models as irv
    import test_models_vqa_ve_nlvr2 as vvn

    def answer(name):
        def make():
            model, cfg = vvn.tiny_model(name)
            return model, (vvn.task_batch(name, cfg),), {}
        return make

    def itm():
        cfg = irv.tiny_cfg()
        torch.manual_seed(0)
        model = irv.jitter(UniterForImageTextRetrieval(cfg, irv.IMG_DIM)).eval()
        b = irv.itm_batch(cfg, [5, 3, 7, 2, 4, 6], [3, 6, 2, 5, 4, 1])
        b["sample_size"] = 3
        return model, (b,), {}

    def itm_hn(side):
        def make():
            cfg = irv.tiny_cfg()
            torch.manual_seed(0)
            model = irv.jitter(UniterForImageTextRetrievalHardNeg(cfg, irv.IMG_DIM,
                                                                  hard_size=3)).train()
            return model, (irv.hn_batch(cfg, side, 6),), {"sample_from": side}
        return make

    def re(loss):
        def make():
            cfg = irv.tiny_cfg()
            torch.manual_seed(0)
            model = irv.jitter(UniterForReferringExpressionComprehension(
                cfg, irv.IMG_DIM, loss=loss, hard_ratio=0.5)).eval()
            return model, (irv.re_batch(cfg, [5, 3, 7], [4, 6, 2]),), {}
        return make

    def vcr():
        cfg = irv.tiny_cfg()
        torch.manual_seed(0)
        model = irv.jitter(irv.vcr_model(UniterForVisualCommonsenseReasoning, cfg)).eval()
        return model, (irv.vcr_batch(cfg),), {}

    cases = {f"answer-{n}": answer(n) for n in vvn.MODELS}   # VQA, VE, NLVR2 x3
    cases.update({"retrieval": itm, "retrieval-hard-neg-t": itm_hn("t"),
                  "retrieval-hard-neg-i": itm_hn("i"), "re-cls": re("cls"),
                  "re-rank": re("rank"), "vcr": vcr})
    return cases


def _one_layer(make):
    """The case with its encoder cut to one layer: the same code paths, a trace half as
    long (the suite's time)."""
    def build():
        model, args, kwargs = make()
        enc = model.uniter.encoder
        enc.layer = enc.layer[:1]
        return model, args, kwargs
    return build


FINETUNE = _finetune_cases()
MODEL_CASES = {k: _one_layer(v) for k, v in dict(
    {f"pretrain-{t}": (lambda t=t: _pretrain_case(t)) for t in PRETRAIN_TASKS},
    **FINETUNE).items()}


def _outputs(out):
    """The tensors of a forward's output (ITM: the loss and both WRA distance sets)."""
    if isinstance(out, tuple):
        itm_loss, (pos, neg) = out
        return [itm_loss, pos, neg]
    return [out]


def _loss(outs):
    if len(outs) == 3:   # UNITER's ITM + WRA objective
        return uniter_fast.itm_ot_loss(outs[0], (outs[1], outs[2]), 0.1)
    return outs[0].float().mean()


def _step(model, args, kwargs):
    """Outputs and parameter gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)               # RE's rank loss draws its negatives
    outs = _outputs(model(*args, **kwargs))
    _loss(outs).backward()
    return ([o.detach() for o in outs],
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _backend(name):
    return contextlib.nullcontext() if name == "auto" else ops.use_backend(name)


#: the padding of the hard batch stays under compile (no data-dependent cut): the same
#: losses, gradients to fp32 rounding (GEMMs over a longer, zero-weighted key axis)
ROUNDING = {"retrieval-hard-neg-t": dict(rtol=1e-5, atol=1e-7)}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_forward_has_no_graph_break(case, backend):
    """torch._dynamo.explain of the model's forward: one graph, no break, on CPU's default
    backends and on the reference ops (the batch checks run before it, as compile_model
    runs them)."""
    model, args, kwargs = MODEL_CASES[case]()
    with _backend(backend):
        torch._dynamo.reset()
        model.validate(*args, **kwargs)
        with dynamo_config():
            explained = torch._dynamo.explain(model.forward)(*args, **kwargs)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", [c for c in MODEL_CASES])
def test_compiled_model_equals_eager(case, backend):
    """The model compiled by compile_model (aot_eager, fullgraph: a break would raise)
    gives the eager outputs (per-token losses: same shapes) and parameter gradients,
    exactly.  Every model on "auto"; on the reference ops the pretraining tasks (the
    fine-tuning heads use no op that differs between the two)."""
    if backend == "reference" and not case.startswith("pretrain-"):
        pytest.skip("the fine-tuning models on the reference ops: explain only (above)")
    model, args, kwargs = MODEL_CASES[case]()
    tol = ROUNDING.get(case, dict(rtol=0, atol=0))
    with _backend(backend):
        compiled = compile_model(copy.deepcopy(model), backend="aot_eager", fullgraph=True,
                                 dynamic=False)     # static shapes: a quicker compilation
        outs, grads = _step(model, args, kwargs)
        outs_c, grads_c = _step(compiled, args, kwargs)
    assert [o.shape for o in outs_c] == [o.shape for o in outs]
    for a, b in zip(outs_c, outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], msg=n, **tol)


def test_second_stage_vcr_pretraining_compiles_without_a_break():
    import test_itr_re_vcr_models as irv
    cfg = irv.tiny_cfg()
    model = irv.vcr_model(UniterForPretrainingForVCR, cfg, 10).eval()
    for task in ("mlm", "mrfr", "mrc-kl"):
        batch = make_batch(task, cfg.vocab_size, irv.IMG_DIM, 10, TXT, NBB,
                           gen=torch.Generator().manual_seed(2))
        batch["txt_type_ids"] = torch.zeros_like(batch["input_ids"])
        torch._dynamo.reset()
        with dynamo_config():
            explained = torch._dynamo.explain(model.forward)(batch, task)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


@pytest.mark.slow
def test_inductor_equals_eager_to_fp32_rounding():
    """The real compiler (inductor, CPU code generation) on ITM + WRA (the C++ WRA ops,
    the data-dependent positive/negative selection), forward and backward: the eager
    losses and gradients to fp32 rounding."""
    for task in ("itm",):
        model, args, kwargs = _pretrain_case(task)
        compiled = compile_model(copy.deepcopy(model))
        outs, grads = _step(model, args, kwargs)
        outs_c, grads_c = _step(compiled, args, kwargs)
        for a, b in zip(outs_c, outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_model_keeps_the_checks_and_the_state_dict():
    """compile_model validates each batch before the compiled call, with the eager errors;
    parameters and state-dict keys are the model's (no _orig_mod. prefix); a second call
    does nothing."""
    model, (batch, task), _ = _pretrain_case("mrfr")
    keys = list(model.state_dict())
    compiled = compile_model(model, backend="aot_eager", dynamic=False)
    assert compile_model(compiled, backend="aot_eager") is compiled
    assert list(compiled.state_dict()) == keys
    before = compile_counts()["compilations"]
    compiled(batch, task)
    bad = dict(batch, feat_targets=batch["feat_targets"][1:])      # one target row short
    with pytest.raises(ValueError, match=r"does not match the \d+ masked regions"):
        compiled(bad, task)
    with pytest.raises(ValueError, match="img_feat contains NaN"):
        compiled(dict(batch, img_feat=batch["img_feat"] * float("nan")), task)
    with pytest.raises(ValueError, match="unknown task"):
        compiled(batch, "nope")
    assert compile_counts()["compilations"] == before + 1       # one compilation for mrfr


def test_batches_of_every_length_compile_once_per_task():
    """Token-bucket batches change every dimension: with compile_model's symbolic shapes a
    task compiles once, whatever the lengths (and gives the eager losses on each batch)."""
    torch.manual_seed(0)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.num_hidden_layers = 1
    model = UniterForPretraining(cfg, 32, 10).eval()
    compiled = compile_model(copy.deepcopy(model), backend="aot_eager")
    torch._dynamo.reset()
    before = compile_counts()["compilations"]
    for i, (txt, nbb) in enumerate([(TXT, NBB), ([9, 2, 4], [3, 8, 5]),
                                    ([3, 11, 6, 5, 7], [7, 2, 9, 4, 6])]):
        batch = make_batch("itm", cfg.vocab_size, 32, 10, txt, nbb,
                           gen=torch.Generator().manual_seed(i))
        got, want = _outputs(compiled(batch, "itm")), _outputs(model(batch, "itm"))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compile_counts()["compilations"] == before + 1


def test_models_built_while_compiling_compile_at_their_first_call():
    """uniter_fast.model.compile.compiling() (infer --compile): the outermost model built in
    it compiles at its first call (that call included, its batch checked first), the
    encoder inside it does not compile on its own, models built outside stay eager."""
    from uniter_fast.model.compile import compiling, is_compiled
    torch.manual_seed(0)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.num_hidden_layers = 1
    with compiling(backend="aot_eager"):
        model = UniterForPretraining(cfg, 32, 10).eval()
    eager = copy.deepcopy(model)
    for m in eager.modules():
        m.__dict__.pop("forward", None)     # the same weights, never compiled
    batch = make_batch("mlm", cfg.vocab_size, 32, 10, TXT, NBB,
                       gen=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="unknown task"):
        model(batch, "nope")                # checked before anything is compiled
    before = compile_counts()["compilations"]
    torch.testing.assert_close(model(batch, "mlm"), eager(batch, "mlm"), rtol=0, atol=0)
    assert is_compiled(model) and not is_compiled(model.uniter)
    assert compile_counts()["compilations"] == before + 1
    assert not is_compiled(UniterForPretraining(cfg, 32, 10))
