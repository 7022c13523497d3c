"""Fine-tuning models (VQA, VE, NLVR2 paired / triplet / paired-attn): state-dict layout
vs the original's, strict loads, outputs and losses vs an independent transcription
(tests/oracle_vqa_ve_nlvr2.py), loss reductions, fp16 state dicts, input checks."""
import os

import oracle_vqa_ve_nlvr2 as orc
import pytest
import torch
from batches import make_batch

import uniter_fast
from uniter_fast import UniterConfig, ops
from uniter_fast.model import (
    AttentionPool,
    MultiheadAttention,
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    UniterForVisualEntailment,
    UniterForVisualQuestionAnswering,
    nlvr2_train_loss,
    vqa_train_loss,
)

IMG_DIM, NUM_ANSWER = 40, 13
CLASSES = {"vqa": UniterForVisualQuestionAnswering, "ve": UniterForVisualEntailment,
           "paired": UniterForNlvr2Paired, "triplet": UniterForNlvr2Triplet,
           "paired-attn": UniterForNlvr2PairedAttn}
MODELS = list(CLASSES)
NLVR2 = ("paired", "triplet", "paired-attn")
# odd sizes: a 1-token text, a 1-region image, pairs of unequal length
TXT, NBB = [5, 1, 9, 7, 3, 6], [4, 7, 1, 3, 5, 2]


def tiny_cfg(dropout=0.0):
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    return cfg


def build(name, cfg, img_dim=IMG_DIM):
    args = (img_dim, NUM_ANSWER) if name == "vqa" else (img_dim,)
    return CLASSES[name](cfg, *args)


def tiny_model(name, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = tiny_cfg(dropout)
    model = build(name, cfg)
    if name in NLVR2:
        model.init_type_embedding()
    with torch.no_grad():   # non-trivial values everywhere so wiring errors show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), cfg


def task_batch(name, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = make_batch("none", cfg.vocab_size, IMG_DIM, 0, TXT, NBB, gen=g)
    n = len(TXT)
    if name in NLVR2:
        types = torch.zeros(n, max(NBB), dtype=torch.long)
        for i, k in enumerate(NBB):
            types[i, :k] = 1 + i % 2 if name != "triplet" else torch.randint(1, 3, (k,), generator=g)
        b["img_type_ids"] = types
        b["targets"] = torch.randint(0, 2, (n // 2 if name != "triplet" else n,), generator=g)
    else:
        na = NUM_ANSWER if name == "vqa" else 3
        t = torch.rand(n, na, generator=g)
        b["targets"] = t * (t > 0.5)            # soft scores, mostly zeros
    return b


def oracle(name, sd, cfg, batch, compute_loss=True):
    if name in ("vqa", "ve"):
        return orc.vqa_forward(sd, cfg, batch, compute_loss)
    return orc.nlvr2_forward(sd, cfg, batch, name, compute_loss)


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("name", MODELS)
def test_state_dict_layout_is_the_originals(name):
    """Keys, shapes and order of the real uniter-base models (meta device: no memory)."""
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-base"))
    with torch.device("meta"):
        model = build(name, cfg, 2048)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == orc.layout(name, cfg, 2048, NUM_ANSWER, type_embedding_initialised=False)
    if name in NLVR2:
        with torch.device("meta"):
            model.init_type_embedding()
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == orc.layout(name, cfg, 2048, NUM_ANSWER)
        assert model.uniter.embeddings.token_type_embeddings.weight.device.type == "meta"
    else:
        assert not hasattr(model, "init_type_embedding")


@pytest.mark.parametrize("name", NLVR2)
def test_init_type_embedding_rows_and_strict_reload(name):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build(name, cfg)
    before = model.uniter.embeddings.token_type_embeddings.weight.detach().clone()
    sd_before = model.state_dict()
    model.init_type_embedding()
    after = model.uniter.embeddings.token_type_embeddings.weight
    assert after.shape == (3, cfg.hidden_size) and after.requires_grad
    ref = orc.init_type_embedding(sd_before)["uniter.embeddings.token_type_embeddings.weight"]
    assert torch.equal(after.detach(), ref)
    assert torch.equal(after[:2].detach(), before)
    # the new embedding is a parameter of the model (so it trains)
    assert any(p is after for p in model.parameters())
    # a fine-tuned state dict loads strictly into a fresh model after the same call ...
    with torch.no_grad():
        after.add_(torch.randn_like(after))
    sd = model.state_dict()
    fresh = build(name, cfg)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(sd, strict=True)
    fresh.init_type_embedding()
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())
    # ... and a second call keeps the fine-tuned third row
    fresh.init_type_embedding()
    assert torch.equal(fresh.uniter.embeddings.token_type_embeddings.weight, sd[
        "uniter.embeddings.token_type_embeddings.weight"])


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("compute_loss", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_outputs_match_transcription(name, compute_loss):
    model, cfg = tiny_model(name)
    batch = task_batch(name, cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with ops.use_backend("reference"):
            out = model(batch, compute_loss=compute_loss)
        ref = oracle(name, sd, cfg, batch, compute_loss)
        auto = model(batch, compute_loss=compute_loss)   # fast CPU backends
    n = len(TXT) // 2 if name in ("paired", "paired-attn") else len(TXT)
    na = {"vqa": NUM_ANSWER, "ve": 3}.get(name, 2)
    expect = (n, na) if compute_loss is False or name in ("vqa", "ve") else (n,)
    assert out.shape == ref.shape == expect
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vqa", "paired-attn"])
def test_fp16_state_dict_loads_and_matches(name):
    """A half-precision checkpoint (as saved by fp16 training) loads into the fp32 model,
    by load_state_dict and by from_pretrained, and computes what its weights compute."""
    model, cfg = tiny_model(name, seed=2)
    half = {k: v.half() for k, v in model.state_dict().items()}
    fresh = build(name, cfg)
    if name in NLVR2:
        fresh.init_type_embedding()
    fresh.load_state_dict(half, strict=True)
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    batch = task_batch(name, cfg, seed=1)
    ref = oracle(name, {k: v.float() for k, v in half.items()}, cfg, batch)
    with torch.no_grad(), ops.use_backend("reference"):
        torch.testing.assert_close(fresh.eval()(batch), ref, rtol=1e-5, atol=1e-6)
    if name == "vqa":
        m2 = UniterForVisualQuestionAnswering.from_pretrained(cfg, half, IMG_DIM, NUM_ANSWER)
        for k, v in m2.state_dict().items():
            assert torch.equal(v, half[k].float()), k


def test_bf16_model_forward_close_to_fp32():
    model, cfg = tiny_model("vqa")
    batch = task_batch("vqa", cfg)
    with torch.no_grad():
        ref = model(batch)
        out = model.to(torch.bfloat16)(batch)
    assert out.dtype == torch.float32          # losses are computed in float32
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", MODELS)
def test_loss_reductions_as_the_original_training_scripts(name):
    model, cfg = tiny_model(name)
    batch = task_batch(name, cfg)
    loss = model(batch)
    want = orc.train_loss(name, loss, batch)
    torch.testing.assert_close(model.reduce_loss(loss), want)
    fn = vqa_train_loss if name in ("vqa", "ve") else nlvr2_train_loss
    torch.testing.assert_close(fn(loss), want)
    if name in ("vqa", "ve"):
        # instance-level BCE: summed over answers, averaged over questions
        torch.testing.assert_close(want, loss.sum(1).mean())
        with pytest.raises(ValueError, match="per-element"):
            vqa_train_loss(loss.mean(1))
    else:
        with pytest.raises(ValueError, match="per-example"):
            nlvr2_train_loss(loss[None])


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_encoder_and_head(name):
    model, cfg = tiny_model(name, dropout=0.1)
    model.train()
    loss = model.reduce_loss(model(task_batch(name, cfg)))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()
               if g is not None)
    assert grads["uniter.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    head = "vqa_output.3.weight" if name in ("vqa", "ve") else "nlvr2_output.weight"
    assert grads[head].abs().sum() > 0
    if name in NLVR2:   # the second image's type embedding trains
        assert grads["uniter.embeddings.token_type_embeddings.weight"][2].abs().sum() > 0


# ----------------------------------------------------------------------------- attention module
def test_multihead_attention_matches_transcription_both_paths():
    torch.manual_seed(0)
    e, h, n = 24, 4, 3
    mha = MultiheadAttention(e, h).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {"m." + k: v.detach() for k, v in mha.state_dict().items()}
    assert list(mha.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                      "out_proj.bias"]
    for tgt, src in ((5, 5), (4, 7)):        # equal lengths use ops.attention; others the plain path
        q, kv = torch.randn(tgt, n, e), torch.randn(src, n, e)
        pad = torch.zeros(n, src, dtype=torch.bool)
        pad[0, src - 2:] = True
        pad[2, 1:] = True
        ref = orc.mha(sd, "m.", q, kv, kv, pad, h)
        fast, w_none = mha(q, kv, kv, key_padding_mask=pad, need_weights=False)
        plain, w = mha(q, kv, kv, key_padding_mask=pad)
        assert w_none is None and w.shape == (n, tgt, src)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.sum(-1), torch.ones(n, tgt))
        assert (w[0, :, src - 2:] == 0).all() and (w[2, :, 1:] == 0).all()
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(q, kv, kv, key_padding_mask=pad[:, :2])


def test_attention_pool_masks_padding():
    torch.manual_seed(0)
    pool = AttentionPool(8)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = pool(x, mask)
    sd = {"attn_pool." + k: v for k, v in pool.state_dict().items()}
    torch.testing.assert_close(out, orc.attn_pool(sd, x, mask))
    # padded positions do not matter
    x2 = x.clone()
    x2[0, 3:] = 100.0
    torch.testing.assert_close(pool(x2, mask)[0], out[0])


# ----------------------------------------------------------------------------- input checks
def test_bad_batches_raise_clear_errors():
    model, cfg = tiny_model("vqa")
    b = task_batch("vqa", cfg)
    with pytest.raises(ValueError, match="missing"):
        model({k: v for k, v in b.items() if k != "targets"})
    assert model({k: v for k, v in b.items() if k != "targets"}, compute_loss=False).shape == \
        (len(TXT), NUM_ANSWER)
    with pytest.raises(ValueError, match=r"targets must be a float tensor \(6, 13\)"):
        model({**b, "targets": b["targets"][:, :5]})
    with pytest.raises(ValueError, match=r"scores in \[0, 1\]"):
        model({**b, "targets": b["targets"] + 2})
    with pytest.raises(ValueError, match="img_dim"):
        model({**b, "img_feat": torch.randn(6, max(NBB), IMG_DIM + 1)})
    with pytest.raises(ValueError, match="batch must be a dict"):
        model([b])

    paired, cfg = tiny_model("paired")
    pb = task_batch("paired", cfg)
    odd = {k: (v[:5] if torch.is_tensor(v) and v.size(0) == 6 else v) for k, v in pb.items()}
    with pytest.raises(ValueError, match="even number"):
        paired(odd)
    with pytest.raises(ValueError, match="targets has 6 entries, expected 3"):
        paired({**pb, "targets": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        paired({**pb, "targets": torch.tensor([0, 2, 1])})
    with pytest.raises(ValueError, match="integer class tensor"):
        paired({**pb, "targets": torch.zeros(3)})
    # image types 1/2 without init_type_embedding()
    torch.manual_seed(0)
    raw = UniterForNlvr2Triplet(cfg, IMG_DIM)
    with pytest.raises(ValueError, match="init_type_embedding"):
        raw(task_batch("triplet", cfg))
    with pytest.raises(ValueError, match="img_type_ids must have shape"):
        paired({**pb, "img_type_ids": pb["img_type_ids"][:, :2]})


def test_validation_can_be_switched_off_and_does_not_change_outputs():
    model, cfg = tiny_model("paired-attn")
    b = task_batch("paired-attn", cfg)
    with torch.no_grad():
        a = model(b)
        model.validate_inputs = False
        c = model(b)
    assert torch.equal(a, c)


def test_constructor_arguments_checked():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="num_answer"):
        UniterForVisualQuestionAnswering(cfg, IMG_DIM, 0)
    with pytest.raises(ValueError, match="img_dim"):
        UniterForNlvr2Paired(cfg, 0)
    assert UniterForVisualEntailment(cfg, IMG_DIM).vqa_output[3].out_features == 3


# ----------------------------------------------------------------------------- the original itself
ORIGINAL_SRC = os.environ.get("UNITER_ORIGINAL_SRC")   # a checkout of ChenRocks/UNITER


@pytest.mark.skipif(not ORIGINAL_SRC, reason="set UNITER_ORIGINAL_SRC to a UNITER checkout")
@pytest.mark.parametrize("name", MODELS)
def test_against_the_original_code(name, monkeypatch):
    """Same seed -> same initial weights; the original class loads our state dict with
    strict=True after the same init_* calls, and computes the same outputs.  apex's
    FusedLayerNorm is replaced by torch's LayerNorm (the same function)."""
    import importlib
    import sys
    import types
    apex = types.ModuleType("apex")
    norm = types.ModuleType("apex.normalization")
    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.FusedLayerNorm = type("FusedLayerNorm", (torch.nn.LayerNorm,), {})
    for mod in (apex, norm, fused):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    pkg = types.ModuleType("model")
    pkg.__path__ = [os.path.join(ORIGINAL_SRC, "model")]
    monkeypatch.setitem(sys.modules, "model", pkg)
    for sub in ("layer", "model", "attention", "vqa", "ve", "nlvr2"):
        # set then deleted: monkeypatch restores "absent" at teardown, so no original module
        # stays importable as model.* after this test
        monkeypatch.setitem(sys.modules, f"model.{sub}", None)
        monkeypatch.delitem(sys.modules, f"model.{sub}")
    omod = importlib.import_module("model.model")
    orig_cls = {"vqa": ("vqa", "UniterForVisualQuestionAnswering"),
                "ve": ("ve", "UniterForVisualEntailment"),
                "paired": ("nlvr2", "UniterForNlvr2Paired"),
                "triplet": ("nlvr2", "UniterForNlvr2Triplet"),
                "paired-attn": ("nlvr2", "UniterForNlvr2PairedAttn")}[name]
    orig_cls = getattr(importlib.import_module("model." + orig_cls[0]), orig_cls[1])
    cfg = tiny_cfg()
    args = (IMG_DIM, NUM_ANSWER) if name == "vqa" else (IMG_DIM,)
    torch.manual_seed(3)
    ours = CLASSES[name](cfg, *args)
    torch.manual_seed(3)
    orig = orig_cls(omod.UniterConfig.from_dict(cfg.to_dict()), *args)
    if name in NLVR2:
        ours.init_type_embedding()
        orig.init_type_embedding()
    so, sg = ours.state_dict(), orig.state_dict()
    assert list(so) == list(sg)
    assert all(torch.equal(so[k], sg[k]) for k in so)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    orig.load_state_dict(ours.state_dict(), strict=True)
    batch = task_batch(name, cfg)
    ours.eval()
    orig.eval()
    with torch.no_grad():
        for compute_loss in (True, False):
            with ops.use_backend("reference"):
                a = ours(batch, compute_loss=compute_loss)
            b = orig(dict(batch), compute_loss=compute_loss)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
