"""The op registry (uniter_fast/ops/_registry.py): selection, per-call
predicates, caching, public reasons, and the measured CPU attention policy."""
import importlib
import os

import pytest
import torch

from uniter_fast import ops, reference
from uniter_fast.ops import _registry
from uniter_fast.ops import cpu_attention_thresholds as thresholds

ops_attention = importlib.import_module("uniter_fast.ops.attention")   # the module
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture
def toy_op():
    """A throw-away op "toy" whose predicates count their calls."""
    calls = {"available": 0, "accepts": 0, "prefer": 0}

    def available(device, dtype):
        calls["available"] += 1
        return None if dtype != torch.float64 else "no float64"

    def accepts(call):
        calls["accepts"] += 1
        x = call.get("x")
        return None if x is None or x.size(-1) <= 8 else f"width {x.size(-1)} > 8"

    def prefer(call):
        calls["prefer"] += 1
        x = call.get("x")
        return x is None or x.size(0) >= 4

    _registry.register("toy", "slow", lambda: (lambda x: "slow"), priority=0)
    _registry.register("toy", "picky", lambda: (lambda x: "picky"), available=available,
                       accepts=accepts, prefer=prefer, priority=10)
    _registry.register("toy", "manual", lambda: (lambda x: "manual"), priority=20, auto=False)
    yield calls
    _registry.unregister("toy")


def _toy(x, backend=None):
    return _registry.resolve("toy", backend, x.device, x.dtype, x=x)(x)


# ----------------------------------------------------------------- generic behaviour


def test_predicates_see_the_call_and_decline_with_a_reason(toy_op):
    assert _toy(torch.zeros(4, 8)) == "picky"
    assert _toy(torch.zeros(4, 9)) == "slow"                 # declined: next candidate
    assert _toy(torch.zeros(2, 8)) == "slow"                 # runnable, not preferred
    assert _toy(torch.zeros(2, 8), "picky") == "picky"       # a name overrides the policy
    with pytest.raises(ops.BackendUnavailableError, match="width 9 > 8"):
        _toy(torch.zeros(4, 9), "picky")
    assert ops.unavailable_reason("toy", "picky", "cpu", torch.float32, x=torch.zeros(1, 9)) \
        == "width 9 > 8"
    assert ops.unavailable_reason("toy", "picky", "cpu", torch.float64) == "no float64"
    assert ops.unavailable_reason("toy", "picky", "cpu", torch.float32) is None
    assert ops.selected_backend("toy", None, "cpu", torch.float32, x=torch.zeros(2, 8)) == "slow"
    assert ops.available_backends("toy", "cpu", x=torch.zeros(1, 9)) == ["slow", "manual"]
    assert ops.available_backends("toy", "cpu") == ["picky", "slow", "manual"]


def test_static_availability_is_cached_per_device_type_and_dtype(toy_op):
    for _ in range(5):
        _toy(torch.zeros(4, 8))
    assert toy_op["available"] == 1          # once for (cpu, float32)
    assert toy_op["accepts"] == 5 and toy_op["prefer"] == 5
    _toy(torch.zeros(4, 8, dtype=torch.float64))
    assert toy_op["available"] == 2
    _registry.clear_cache()
    _toy(torch.zeros(4, 8))
    assert toy_op["available"] == 3


def test_shape_blind_ops_resolve_from_the_cache(monkeypatch):
    # layer_norm / gelu / ipot do not look at the call: after the first call the
    # registry neither re-sorts nor re-checks backends
    x, w, b = torch.randn(3, 5), torch.ones(5), torch.zeros(5)
    ops.layer_norm(x, w, b)
    ops.gelu(x)

    def boom(*a, **k):
        raise AssertionError("re-resolved")
    monkeypatch.setattr(_registry, "registered_backends", boom)
    monkeypatch.setattr(_registry, "_static_info", boom)
    for _ in range(3):
        ops.layer_norm(x, w, b)
        ops.gelu(x)


def test_predicate_errors_become_reasons(toy_op):
    def bad(call):
        raise RuntimeError("bug")
    _registry.register("toy", "broken", lambda: (lambda x: "broken"), accepts=bad, priority=30)
    assert "RuntimeError" in ops.unavailable_reason("toy", "broken", "cpu", x=torch.zeros(1))
    assert _toy(torch.zeros(4, 8)) == "picky"


def test_dispatch_seam():
    assert ops.available_backends("attention", "cpu")[0] == "sdpa"
    assert "reference" in ops.available_backends("ipot", "cpu")
    q = torch.randn(1, 1, 3, 4)
    m = torch.ones(1, 3)
    with ops.use_backend("reference"):
        assert ops.current_backend("attention") == "reference"
        assert ops.current_backend("ipot") == "reference"
        assert ops.current_backend("ipot_distance") == "reference"
        assert ops.current_backend("cost_matrix_cosine") == "reference"
        out_ref = ops.attention(q, q, q, m)
    assert ops.current_backend("attention") == "auto"
    torch.testing.assert_close(out_ref, reference.attention(q, q, q, m))
    with ops.use_backend({"attention": "sdpa"}):
        assert ops.current_backend("attention") == "sdpa"
        assert ops.current_backend("ipot") == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("nope"):
            pass
    with pytest.raises(ValueError, match="no backend 'nope'"):
        with ops.use_backend({"attention": "nope"}):
            pass
    with pytest.raises(ValueError, match="no backend 'nope'"):
        ops.attention(q, q, q, m, backend="nope")
    with pytest.raises(ValueError, match="unknown op"):
        ops.available_backends("nope")
    if not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError, match="unavailable"):
            ops.ipot(torch.rand(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool),
                     torch.zeros(1, 3, dtype=torch.bool), backend="cuda")
        assert "CUDA" in ops.unavailable_reason("ipot", "cuda", "cpu")
        assert "CUDA" in ops.unavailable_reason("ipot_distance", "cuda", "cpu")


def test_ipot_distance_is_an_op_with_its_own_backends():
    assert set(ops.registered_backends("ipot_distance")) == {"reference", "cpp", "triton", "cuda"}
    if "cpp" in ops.available_backends("ipot", "cpu"):
        # "auto" on CPU: the C++ kernel, never the Triton interpreter
        assert ops.selected_backend("ipot", None, "cpu") == "cpp"
        assert ops.selected_backend("ipot_distance", None, "cpu") == "cpp"
    assert ops.selected_backend("ipot_distance", None, CUDA) == "cuda" or \
        ops.unavailable_reason("ipot_distance", "cuda", CUDA) is not None


# ----------------------------------------------------------------- attention policy


def test_attention_triton_priority_and_cpu_policy():
    names = ops.registered_backends("attention")
    assert names.index("triton") < names.index("sdpa")
    q = torch.zeros(2, 2, 9, 64)
    # on CUDA "auto" picks triton for the kernel's dtypes (decided without a GPU)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert ops.selected_backend("attention", None, CUDA, dt, q=q) == "triton"
    assert ops.selected_backend("attention", None, CUDA, torch.float64, q=q) == "sdpa"
    # the kernel declines a head wider than it was written for: sdpa instead
    wide = torch.zeros(2, 2, 9, 256)
    assert ops.selected_backend("attention", None, CUDA, torch.float16, q=wide) == "sdpa"
    assert "head_dim" in ops.unavailable_reason("attention", "triton", CUDA, torch.float16, q=wide)
    assert ops.unavailable_reason("attention", "triton", CUDA, torch.float16, q=q) is None
    # on CPU the interpreter is opt-in by name only
    assert ops.selected_backend("attention", None, CPU, q=q) != "triton"
    if INTERPRET:
        assert ops.selected_backend("attention", "triton", CPU, q=q) == "triton"
        assert ops.available_backends("attention", CPU)[-1] == "triton"
        with ops.use_backend("triton"):
            assert ops.selected_backend("attention", None, CPU, q=q) == "triton"
    with pytest.raises(ops.BackendUnavailableError):
        ops.selected_backend("attention", "triton", CPU, torch.float64, q=q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_auto_attention_follows_the_measured_thresholds(monkeypatch, dtype):
    name = str(dtype).replace("torch.", "")
    monkeypatch.setitem(ops_attention.SDPA_MIN_SEQ, name, {"fwd": 40, "fwd+bwd": 100})
    m = torch.ones(1, 39)

    def picked(seq, grad):
        q = torch.zeros(1, 2, seq, 8, dtype=dtype, requires_grad=grad)
        return ops.selected_backend("attention", None, CPU, dtype, q=q, attn_mask=m)

    assert picked(39, False) == "reference" and picked(40, False) == "sdpa"
    assert picked(99, True) == "reference" and picked(100, True) == "sdpa"
    with torch.no_grad():                        # no autograd: the forward threshold
        assert picked(60, True) == "sdpa"
    with ops.use_backend("sdpa"):                # a selection overrides the policy
        assert picked(8, True) == "sdpa"
    # the op itself runs what the policy picked, and it is correct either way
    for seq in (39, 40):
        q, k, v = (torch.randn(2, 2, seq, 8, dtype=dtype) for _ in range(3))
        mask = torch.ones(2, seq)
        mask[1, seq // 2:] = 0
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ops.attention(q, k, v, mask).float(),
                                   reference.attention(q.double(), k.double(), v.double(),
                                                       mask).float(), rtol=tol, atol=tol)
    # an unmeasured dtype gets SDPA at every length
    monkeypatch.delitem(ops_attention.SDPA_MIN_SEQ, name)
    assert picked(8, True) == "sdpa"


def test_shipped_thresholds_are_a_measurement():
    # written by benchmarks/attention_thresholds.py --write: one place, with its provenance
    assert ops_attention.SDPA_MIN_SEQ is thresholds.SDPA_MIN_SEQ
    assert {"date", "cpu", "threads", "shape", "grid", "torch"} <= set(thresholds.MEASURED)
    assert set(thresholds.SDPA_MIN_SEQ) == {"float32", "bfloat16"}
    grid = thresholds.MEASURED["grid"]
    for table in thresholds.SDPA_MIN_SEQ.values():
        assert set(table) == {"fwd", "fwd+bwd"}
        for v in table.values():
            assert isinstance(v, int) and (v in grid or v == max(grid) + 1)
