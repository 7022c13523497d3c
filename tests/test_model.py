"""Core model: UNITER state-dict compatibility, task outputs vs an independent oracle, input checks."""

import pytest
import torch
from batches import make_batch
from oracle import pretrain_forward

import uniter_fast
from uniter_fast import UniterConfig, UniterForPretraining, ops

IMG_DIM, LABEL_DIM = 48, 9
TASKS = ["mlm", "mrfr", "mrc", "mrc-kl", "itm"]


def expected_shapes(cfg, img_dim, label_dim):
    """UNITER's pretraining state dict, listed from the original architecture."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    e = {
        "uniter.embeddings.word_embeddings.weight": (v, h),
        "uniter.embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "uniter.embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "uniter.embeddings.LayerNorm.weight": (h,), "uniter.embeddings.LayerNorm.bias": (h,),
        "uniter.img_embeddings.img_linear.weight": (h, img_dim),
        "uniter.img_embeddings.img_linear.bias": (h,),
        "uniter.img_embeddings.pos_linear.weight": (h, 7),
        "uniter.img_embeddings.pos_linear.bias": (h,),
        "uniter.img_embeddings.mask_embedding.weight": (2, img_dim),
        "uniter.pooler.dense.weight": (h, h), "uniter.pooler.dense.bias": (h,),
        "cls.predictions.bias": (v,),
        "cls.predictions.transform.dense.weight": (h, h),
        "cls.predictions.transform.dense.bias": (h,),
        "cls.predictions.decoder.weight": (v, h),
        "feat_regress.weight": (h, img_dim), "feat_regress.bias": (img_dim,),
        "feat_regress.net.0.weight": (h, h), "feat_regress.net.0.bias": (h,),
        "region_classifier.net.0.weight": (h, h), "region_classifier.net.0.bias": (h,),
        "region_classifier.net.3.weight": (label_dim, h),
        "region_classifier.net.3.bias": (label_dim,),
        "itm_output.weight": (2, h), "itm_output.bias": (2,),
    }
    for ln in ("uniter.img_embeddings.img_layer_norm", "uniter.img_embeddings.pos_layer_norm",
               "uniter.img_embeddings.LayerNorm", "cls.predictions.transform.LayerNorm",
               "feat_regress.net.2", "region_classifier.net.2"):
        e[ln + ".weight"] = (h,)
        e[ln + ".bias"] = (h,)
    for n in range(cfg.num_hidden_layers):
        p = f"uniter.encoder.layer.{n}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            e[p + m + ".weight"], e[p + m + ".bias"] = (h, h), (h,)
        e[p + "intermediate.dense.weight"], e[p + "intermediate.dense.bias"] = (i, h), (i,)
        e[p + "output.dense.weight"], e[p + "output.dense.bias"] = (h, i), (h,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            e[p + ln + ".weight"], e[p + ln + ".bias"] = (h,), (h,)
    return e


@pytest.mark.parametrize("name,layers,hidden", [("uniter-base", 12, 768), ("uniter-large", 24, 1024)])
def test_state_dict_keys_and_shapes(name, layers, hidden):
    cfg = UniterConfig.from_json_file(uniter_fast.config_path(name))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (layers, hidden, 28996)
    with torch.device("meta"):
        model = UniterForPretraining(cfg, img_dim=2048, img_label_dim=1601)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(cfg, 2048, 1601)


def test_config_sources_agree(tmp_path):
    path = uniter_fast.config_path("uniter-base")
    a = UniterConfig(path)                      # original style: json path as first arg
    b = UniterConfig.from_json_file(path)
    c = UniterConfig.from_dict(b.to_dict())
    d = UniterConfig(28996)                     # vocab size + defaults = uniter-base
    assert a == b == c == d
    with pytest.raises(ValueError, match="not a multiple"):
        UniterConfig(100, hidden_size=30, num_attention_heads=4)


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    model = UniterForPretraining(cfg, IMG_DIM, LABEL_DIM)
    # non-trivial LayerNorm and bias values so wiring errors show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), cfg


LENS = ([5, 1, 9, 7], [4, 7, 1, 3])   # odd sizes, a 1-token text and a 1-region image


@pytest.mark.parametrize("task", TASKS)
def test_matches_independent_oracle(task):
    model, cfg = tiny_model()
    batch = make_batch(task, cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with ops.use_backend("reference"):
        out = model(batch, task)
    ref = pretrain_forward(sd, cfg, batch, task)
    if task == "itm":
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(out[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert out[1][0].numel() + out[1][1].numel() == len(LENS[0])
    else:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the fast CPU backends (auto) agree too
    out_auto = model(batch, task)
    torch.testing.assert_close(out_auto[0] if task == "itm" else out_auto,
                               ref[0] if task == "itm" else ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_forward_backward_finite_and_tied_grads(task):
    model, cfg = tiny_model(dropout=0.1)
    model.train()
    batch = make_batch(task, cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS)
    out = model(batch, task)
    loss = uniter_fast.itm_ot_loss(out[0], out[1], 0.1) if task == "itm" else out.mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    enc = "uniter.encoder.layer.0.attention.self.query.weight"
    assert grads[enc].abs().sum() > 0
    # tied weights are one tensor: the head and the embedding share storage and grad
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    if task == "mrfr":
        assert grads["uniter.img_embeddings.mask_embedding.weight"][1].abs().sum() > 0


@pytest.mark.parametrize("task", TASKS)
def test_uint8_and_bool_masks_identical(task):
    model, cfg = tiny_model()
    b8 = make_batch(task, cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS, mask_dtype=torch.uint8)
    bb = make_batch(task, cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS, mask_dtype=torch.bool)
    assert b8["attn_masks"].dtype == torch.uint8 and bb["attn_masks"].dtype == torch.bool
    o8, ob = model(b8, task), model(bb, task)
    if task == "itm":
        assert torch.equal(o8[0], ob[0])
        assert all(torch.equal(x, y) for x, y in zip(o8[1], ob[1]))
    else:
        assert torch.equal(o8, ob)


def test_itm_without_ot_inputs_returns_none():
    model, cfg = tiny_model()
    batch = make_batch("itm", cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS)
    del batch["ot_inputs"]
    loss, ot = model(batch, "itm")
    assert ot is None and loss.shape == (4,)
    scores, _ = model(batch, "itm", compute_loss=False)
    assert scores.shape == (4, 2)


def test_itm_ot_loss_formula_and_edge_cases():
    itm = torch.rand(5)
    pos, neg = torch.rand(3), torch.rand(2)
    got = uniter_fast.itm_ot_loss(itm, (pos, neg), 0.3)
    torch.testing.assert_close(got, itm.mean() + 0.3 * (pos.sum() - neg.sum()) / 5)
    only_neg = uniter_fast.itm_ot_loss(itm, (torch.empty(0), neg), 0.3)
    torch.testing.assert_close(only_neg, itm.mean() - 0.3 * neg.sum() / 2)
    only_pos = uniter_fast.itm_ot_loss(itm, (pos, torch.empty(0)), 0.3)
    torch.testing.assert_close(only_pos, itm.mean() + 0.3 * pos.sum() / 3)
    empty = uniter_fast.itm_ot_loss(torch.empty(0).new_zeros(1), (torch.empty(0), torch.empty(0)), 0.3)
    assert torch.isfinite(empty)
    assert torch.equal(uniter_fast.itm_ot_loss(itm, None, 0.3), itm.mean())


def test_from_pretrained_and_strict_load(tmp_path):
    model, cfg = tiny_model(seed=1)
    sd = model.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json_string())
    loaded = torch.load(path)
    # TF-style names as in old BERT checkpoints are renamed like the original does
    loaded = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in loaded.items()}
    m2 = UniterForPretraining.from_pretrained(str(cfg_file), loaded, IMG_DIM, LABEL_DIM)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    m3 = UniterForPretraining(cfg, IMG_DIM, LABEL_DIM)
    m3.load_state_dict(torch.load(path), strict=True)
    assert m3.cls.predictions.decoder.weight is m3.uniter.embeddings.word_embeddings.weight
    bad = dict(sd)
    bad["itm_output.weight"] = torch.zeros(3, cfg.hidden_size)
    with pytest.raises(RuntimeError, match="size mismatch"):
        UniterForPretraining.from_pretrained(str(cfg_file), bad, IMG_DIM, LABEL_DIM)


def _bad(batch, **changes):
    b = dict(batch)
    b.update(changes)
    return b


def test_bad_inputs_raise_clear_errors():
    model, cfg = tiny_model()
    batch = make_batch("mlm", cfg.vocab_size, IMG_DIM, LABEL_DIM, *LENS)
    with pytest.raises(ValueError, match="unknown task"):
        model(batch, "vqa")
    with pytest.raises(ValueError, match="batch size mismatch"):
        model(_bad(batch, img_feat=batch["img_feat"][:3], img_pos_feat=batch["img_pos_feat"][:3]), "mlm")
    with pytest.raises(ValueError, match="img_dim"):
        model(_bad(batch, img_feat=torch.randn(4, batch["img_feat"].size(1), IMG_DIM + 1)), "mlm")
    g = batch["gather_index"].clone()
    g[1, 2] = 10_000
    with pytest.raises(ValueError, match="gather_index out of range"):
        model(_bad(batch, gather_index=g), "mlm")
    f = batch["img_feat"].clone()
    f[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="img_feat contains NaN"):
        model(_bad(batch, img_feat=f), "mlm")
    with pytest.raises(ValueError, match="missing"):
        model(batch, "itm")
    with pytest.raises(ValueError, match="img_dim"):
        UniterForPretraining(cfg, 0, LABEL_DIM)
