"""Retrieval (ITR, hard negatives), referring-expression and VCR models (incl. the
second-stage VCR pretraining model): state-dict layout vs the original's, strict loads after
the init_* calls, outputs and losses vs an independent transcription
(tests/oracle_itr_re_vcr.py), the scripts' loss reductions, hard-negative selection and RE
negative sampling, input checks."""
import oracle_itr_re_vcr as orc
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
    has_rank_output,
    itm_hard_neg_train_loss,
    itm_rank_train_loss,
    load_checkpoint,
    re_train_loss,
    sample_neg_ix,
    select_hard_negatives,
    vcr_train_loss,
)

IMG_DIM, LABEL_DIM, N_SPECIAL = 40, 9, 81
RTOL, ATOL = 1e-5, 1e-6


def tiny_cfg():
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    return cfg


def jitter(model):
    with torch.no_grad():   # non-trivial values everywhere so wiring errors show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def sd_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def vcr_model(cls, cfg, *args):
    m = cls(cfg, IMG_DIM, *args)
    m.init_type_embedding()
    m.init_word_embedding(N_SPECIAL)
    return m


# ----------------------------------------------------------------------------- layout
LAYOUTS = [("itm", lambda c: UniterForImageTextRetrieval(c, 2048), {}),
           ("itm-hn", lambda c: UniterForImageTextRetrievalHardNeg(c, 2048, hard_size=31), {}),
           ("re", lambda c: UniterForReferringExpressionComprehension(c, 2048), {"mlp": 1}),
           ("re", lambda c: UniterForReferringExpressionComprehension(c, 2048, loss="rank",
                                                                       mlp=2), {"mlp": 2}),
           ("vcr", lambda c: UniterForVisualCommonsenseReasoning(c, 2048), {}),
           ("pretrain-vcr", lambda c: UniterForPretrainingForVCR(c, 2048, 1601),
            {"label_dim": 1601})]


@pytest.mark.parametrize("name,build,kw", LAYOUTS, ids=[f"{n}-{i}" for i, (n, _, _) in
                                                        enumerate(LAYOUTS)])
def test_state_dict_layout_is_the_originals(name, build, kw):
    """Keys, shapes and order of the uniter-base models (meta device: no memory), VCR models
    before and after init_type_embedding() / init_word_embedding(81)."""
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-base"))
    with torch.device("meta"):
        model = build(cfg)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if name.endswith("vcr"):
        if name == "pretrain-vcr":   # before init: the plain pretraining layout
            with torch.device("meta"):
                plain = UniterForPretraining(cfg, 2048, 1601)
            assert got == [(k, tuple(v.shape)) for k, v in plain.state_dict().items()]
        else:
            assert got == orc.layout(name, cfg, 2048, initialised=False, **kw)
        with torch.device("meta"):
            model.init_type_embedding()
            model.init_word_embedding(N_SPECIAL)
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert model.config.vocab_size == 28996          # not updated, as in the original
    assert got == orc.layout(name, cfg, 2048, **kw)


def test_bad_constructor_arguments():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="mlp must be 1 or 2"):
        UniterForReferringExpressionComprehension(cfg, IMG_DIM, mlp=3)
    with pytest.raises(ValueError, match="loss must be one of"):
        UniterForReferringExpressionComprehension(cfg, IMG_DIM, loss="ce")
    with pytest.raises(ValueError, match="hard_size"):
        UniterForImageTextRetrievalHardNeg(cfg, IMG_DIM, hard_size=0)


# ----------------------------------------------------------------------------- loading
def test_retrieval_from_pretraining_checkpoint_and_init_output():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    pre = jitter(UniterForPretraining(cfg, IMG_DIM, LABEL_DIM))
    ckpt = sd_of(pre)
    m = UniterForImageTextRetrieval.from_pretrained(cfg, ckpt, IMG_DIM)
    assert not has_rank_output(ckpt, m)
    m.init_output()
    assert torch.equal(m.rank_output.weight, ckpt["itm_output.weight"][1:])
    assert torch.equal(m.rank_output.bias, ckpt["itm_output.bias"][1:])
    # a copy, not a view of itm_output (the original aliased the storage)
    assert m.rank_output.weight.data_ptr() != m.itm_output.weight.data_ptr()
    assert torch.equal(m.uniter.embeddings.word_embeddings.weight,
                       ckpt["uniter.embeddings.word_embeddings.weight"])
    # a fine-tuned checkpoint has the real keys (also DDP-wrapped): keep its head
    with torch.no_grad():
        m.rank_output.weight.add_(1.0)
    tuned = sd_of(m)
    assert has_rank_output(tuned, m)
    assert has_rank_output({"module." + k: v for k, v in tuned.items()}, m)
    fresh = UniterForImageTextRetrievalHardNeg(cfg, IMG_DIM)
    fresh.load_state_dict(tuned, strict=True)
    assert torch.equal(fresh.rank_output.weight, tuned["rank_output.weight"])


@pytest.mark.parametrize("cls", [UniterForVisualCommonsenseReasoning, UniterForPretrainingForVCR])
def test_vcr_init_calls_rows_and_strict_reload(cls):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    args = (LABEL_DIM,) if cls is UniterForPretrainingForVCR else ()
    m = jitter(cls(cfg, IMG_DIM, *args))
    before = sd_of(m)
    m.init_type_embedding()
    m.init_word_embedding(N_SPECIAL)
    emb = m.uniter.embeddings
    tt, wt = "uniter.embeddings.token_type_embeddings.weight", "uniter.embeddings.word_embeddings.weight"
    assert torch.equal(emb.token_type_embeddings.weight,
                       orc.vcr_init(before, emb.word_embeddings.weight[cfg.vocab_size:])[tt])
    assert torch.equal(emb.word_embeddings.weight[:cfg.vocab_size], before[wt])
    assert emb.word_embeddings.num_embeddings == cfg.vocab_size + N_SPECIAL
    assert emb.word_embeddings.padding_idx is None                 # as the original's new one
    assert any(p is emb.word_embeddings.weight for p in m.parameters())
    if cls is UniterForPretrainingForVCR:   # the MLM decoder is tied to the grown embedding
        assert m.cls.predictions.decoder.weight is emb.word_embeddings.weight
        assert m.cls.predictions.bias.shape == (cfg.vocab_size + N_SPECIAL,)
    sd = sd_of(jitter(m))
    fresh = cls(cfg, IMG_DIM, *args)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(sd, strict=True)
    fresh.init_type_embedding()
    fresh.init_word_embedding(N_SPECIAL)
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())


def test_vcr_finetuning_starts_from_second_stage_checkpoint():
    """train_vcr.py --checkpoint_from vcr_pretrain: the 2nd-stage model's keys fill the
    VCR model's encoder after its init_* calls."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    pre = jitter(vcr_model(UniterForPretrainingForVCR, cfg, LABEL_DIM))
    ckpt = sd_of(pre)
    m = vcr_model(UniterForVisualCommonsenseReasoning, cfg)
    report = load_checkpoint(m, ckpt)
    assert not [k for k in report.missing if k.startswith("uniter.")]
    for k, v in m.state_dict().items():
        if k.startswith("uniter."):
            assert torch.equal(v, ckpt[k]), k


# ----------------------------------------------------------------------------- ITR numerics
TXT, NBB = [5, 1, 9, 7, 3, 6], [4, 7, 1, 3, 5, 2]


def itm_batch(cfg, txt, nbb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_batch("none", cfg.vocab_size, IMG_DIM, 0, txt, nbb, gen=g)


@pytest.mark.parametrize("sample_size", [2, 3])
def test_itm_scores_and_triplet_loss_match_transcription(sample_size):
    torch.manual_seed(1)
    cfg = tiny_cfg()
    m = jitter(UniterForImageTextRetrieval(cfg, IMG_DIM, margin=0.3)).eval()
    batch = itm_batch(cfg, TXT, NBB)
    batch["sample_size"] = sample_size
    sd = sd_of(m)
    with torch.no_grad(), ops.use_backend("reference"):
        scores = m(batch, compute_loss=False)
        loss = m(batch)
    close(scores, orc.itm_rank_forward(sd, cfg, batch, compute_loss=False))
    want = orc.itm_rank_forward(sd, cfg, batch, margin=0.3)
    assert loss.shape == (len(TXT) // sample_size, sample_size - 1)
    close(loss, want)
    close(itm_rank_train_loss(loss), orc.train_loss("itm", want))
    assert (loss > 0).any()


def test_itm_batch_checks():
    cfg = tiny_cfg()
    m = UniterForImageTextRetrieval(cfg, IMG_DIM)
    batch = itm_batch(cfg, TXT, NBB)
    with pytest.raises(ValueError, match="missing \\['sample_size'\\]"):
        m(batch)
    batch["sample_size"] = 4
    with pytest.raises(ValueError, match="sample_size must be an int >= 2 dividing"):
        m(batch)


def hn_batch(cfg, sample_from, n, seed=0):
    """A hard-negative batch as the datasets give it: one text ('t') or one image ('i')."""
    g = torch.Generator().manual_seed(seed)
    if sample_from == "t":
        b = make_batch("none", cfg.vocab_size, IMG_DIM, 0, [6] * n,
                       [1 + (5 * k) % 7 for k in range(n)], gen=g)
        b["input_ids"] = b["input_ids"][:1]
    else:
        b = make_batch("none", cfg.vocab_size, IMG_DIM, 0, [1 + (3 * k) % 8 for k in range(n)],
                       [5] * n, gen=g)
        b["img_feat"], b["img_pos_feat"] = b["img_feat"][:1], b["img_pos_feat"][:1]
    b["attn_masks"] = b["attn_masks"].long()
    return b


@pytest.mark.parametrize("sample_from", ["t", "i"])
def test_hard_negative_training_forward_matches_transcription(sample_from):
    torch.manual_seed(2)
    cfg = tiny_cfg()
    hard = 4
    m = jitter(UniterForImageTextRetrievalHardNeg(cfg, IMG_DIM, margin=0.4, hard_size=hard))
    m.train()
    batch = hn_batch(cfg, sample_from, 11)
    keep = {k: v.clone() for k, v in batch.items()}
    sd = sd_of(m)
    with ops.use_backend("reference"):
        loss = m(batch, sample_from=sample_from)
    assert m.training
    assert all(torch.equal(batch[k], keep[k]) for k in keep)    # the caller's batch untouched
    want, order = orc.hard_neg_forward(sd, cfg, batch, sample_from, hard, margin=0.4)
    assert loss.shape == (1, hard)
    close(loss, want)
    loss_scaled = itm_hard_neg_train_loss(loss, 8)
    close(loss_scaled, orc.train_loss("itm-hn", want, 8))
    loss_scaled.backward()
    assert m.rank_output.weight.grad is not None
    # the kept rows are the positive and the top-scoring negatives
    with torch.no_grad(), ops.use_backend("reference"):
        scores = m.eval()(batch, sample_from=sample_from, compute_loss=False)
    assert select_hard_negatives(scores, hard).tolist() == [0] + order
    # eval mode / compute_loss=False: plain scores of every row
    close(scores.view(-1), torch.stack([
        orc.itm_rank_forward(sd, cfg, one, compute_loss=False).view(())
        for one in _rows(batch, sample_from)]))
    with pytest.raises(ValueError, match="sample_from"):
        m(batch, sample_from="x")


def _rows(batch, sample_from):
    out = []
    for r in range(batch["attn_masks"].size(0)):
        ti, ii = (0, r) if sample_from == "t" else (r, 0)
        tl = int((batch["input_ids"][ti] != 0).sum())
        nbb = int(batch["attn_masks"][r].sum()) - tl
        out.append({"input_ids": batch["input_ids"][ti:ti + 1, :tl],
                    "position_ids": torch.arange(tl)[None],
                    "img_feat": batch["img_feat"][ii:ii + 1, :nbb],
                    "img_pos_feat": batch["img_pos_feat"][ii:ii + 1, :nbb],
                    "attn_masks": torch.ones(1, tl + nbb, dtype=torch.long),
                    "gather_index": torch.arange(tl + nbb)[None]})
    return out


@pytest.mark.parametrize("n,hard", [(2, 1), (17, 5), (33, 32), (300, 31)])
def test_select_hard_negatives_against_a_sort(n, hard):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, 1, generator=g)
    got = select_hard_negatives(scores, hard).tolist()
    s = scores.view(-1).tolist()
    want = [0] + sorted(range(1, n), key=lambda j: -s[j])[:hard]
    assert got == want
    scores[0] = 100.0                     # the positive is kept even when it scores highest
    assert select_hard_negatives(scores, hard).tolist()[0] == 0
    with pytest.raises(ValueError, match="hard_size must be an int in"):
        select_hard_negatives(scores, n)


# ----------------------------------------------------------------------------- RE numerics
def re_batch(cfg, txt, nbb, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = make_batch("none", cfg.vocab_size, IMG_DIM, 0, txt, nbb, gen=g)
    n, m = len(nbb), max(nbb)
    b["obj_masks"] = torch.ones(n, m, dtype=torch.uint8)
    for i, k in enumerate(nbb):
        b["obj_masks"][i, :k] = 0
    b["txt_lens"], b["num_bbs"] = list(txt), list(nbb)
    b["targets"] = torch.tensor([[int(torch.randint(k, (1,), generator=g))] for k in nbb])
    return b


@pytest.mark.parametrize("mlp", [1, 2])
def test_re_cls_scores_and_loss_match_transcription(mlp):
    torch.manual_seed(3)
    cfg = tiny_cfg()
    m = jitter(UniterForReferringExpressionComprehension(cfg, IMG_DIM, mlp=mlp)).eval()
    txt, nbb = [5, 1, 9, 7], [4, 7, 2, 3]
    batch = re_batch(cfg, txt, nbb)
    sd = sd_of(m)
    with torch.no_grad(), ops.use_backend("reference"):
        scores = m(batch, compute_loss=False)
        loss = m(batch)
    want_s = orc.re_scores(sd, cfg, batch, mlp)
    close(scores, want_s)
    assert (scores[batch["obj_masks"].bool()] == -1e4).all()
    want = orc.re_loss(sd, cfg, batch, mlp=mlp)
    assert loss.shape == (len(txt),)
    close(loss, want)
    close(re_train_loss(loss), orc.train_loss("re", want))


def test_re_rank_loss_matches_transcription_with_the_drawn_negatives():
    torch.manual_seed(4)
    cfg = tiny_cfg()
    m = jitter(UniterForReferringExpressionComprehension(cfg, IMG_DIM, loss="rank", margin=0.5,
                                                         hard_ratio=0.5)).eval()
    txt, nbb = [5, 1, 9, 7, 4], [4, 7, 2, 3, 6]
    batch = re_batch(cfg, txt, nbb, seed=1)
    sd = sd_of(m)
    m.generator = torch.Generator().manual_seed(7)
    with torch.no_grad(), ops.use_backend("reference"):
        loss = m(batch)
        scores = m(batch, compute_loss=False)
    neg = sample_neg_ix(scores, batch["targets"], nbb, 0.5, torch.Generator().manual_seed(7))
    close(loss, orc.re_loss(sd, cfg, batch, loss="rank", margin=0.5, neg_ix=neg))
    with pytest.raises(ValueError, match="at least 2 regions"):
        sample_neg_ix(scores[:1], batch["targets"][:1], [1], 0.5)


@pytest.mark.parametrize("hard_ratio", [0.0, 0.3, 1.0])
def test_re_negative_sampling(hard_ratio):
    g = torch.Generator().manual_seed(0)
    n = 3000
    nbb = [2 + (k * 7) % 9 for k in range(n)]
    m = max(nbb)
    scores = torch.randn(n, m, generator=g)
    for i, k in enumerate(nbb):
        scores[i, k:] = -1e4
    targets = torch.tensor([(k * 5) % b for k, b in enumerate(nbb)])
    neg = sample_neg_ix(scores, targets, nbb, hard_ratio, torch.Generator().manual_seed(1))
    assert (neg != targets).all() and (neg < torch.tensor(nbb)).all() and (neg >= 0).all()
    hardest = scores.masked_fill(torch.nn.functional.one_hot(targets, m).bool(),
                                 float("-inf")).argmax(1)
    frac_hard = float((neg == hardest).float().mean())
    # an easy draw hits the hardest region with probability 1 / (nbb - 1)
    p_easy_hit = float((1.0 / (torch.tensor(nbb, dtype=torch.float) - 1)).mean())
    expect = hard_ratio + (1 - hard_ratio) * p_easy_hit
    assert abs(frac_hard - expect) < 0.03, (frac_hard, expect)
    if hard_ratio == 0.0:   # uniform over the non-target regions: every one gets drawn
        rows = [i for i, k in enumerate(nbb) if k == 10]
        counts = torch.bincount(neg[rows] - (neg[rows] > targets[rows]).long(), minlength=9)
        assert counts.min() > len(rows) / 9 * 0.6


def test_re_batch_checks():
    cfg = tiny_cfg()
    m = UniterForReferringExpressionComprehension(cfg, IMG_DIM)
    batch = re_batch(cfg, [3, 4], [2, 5])
    bad = dict(batch, num_bbs=[2])
    with pytest.raises(ValueError, match="one entry per example"):
        m(bad)
    bad = dict(batch, targets=torch.tensor([[0], [5]]))
    with pytest.raises(ValueError, match="out of range"):
        m(bad)


# ----------------------------------------------------------------------------- VCR numerics
def vcr_batch(cfg, seed=0, rows=8):
    g = torch.Generator().manual_seed(seed)
    txt = [3 + (k * 5) % 9 for k in range(rows)]
    nbb = [2 + (k * 3) % 6 for k in range(rows)]
    b = make_batch("none", cfg.vocab_size + N_SPECIAL, IMG_DIM, 0, txt, nbb, gen=g)
    types = torch.zeros_like(b["input_ids"])
    for i, t in enumerate(txt):
        types[i, :t] = torch.randint(0, 4, (t,), generator=g)
    b["txt_type_ids"] = types
    b["targets"] = torch.tensor([[int(k % 4 == 1)] for k in range(rows)])
    return b


def test_vcr_scores_and_loss_match_transcription():
    torch.manual_seed(5)
    cfg = tiny_cfg()
    m = jitter(vcr_model(UniterForVisualCommonsenseReasoning, cfg)).eval()
    batch = vcr_batch(cfg)
    assert int(batch["input_ids"].max()) >= cfg.vocab_size      # special tokens are used
    sd = sd_of(m)
    with torch.no_grad(), ops.use_backend("reference"):
        scores = m(batch, compute_loss=False)
        loss = m(batch)
    close(scores, orc.vcr_forward(sd, cfg, batch, compute_loss=False))
    want = orc.vcr_forward(sd, cfg, batch)
    assert scores.shape == (8, 1) and loss.dim() == 0
    close(loss, want)
    close(vcr_train_loss(loss), orc.train_loss("vcr", want))


def test_vcr_token_ids_checked_against_the_real_embedding_rows():
    cfg = tiny_cfg()
    m = UniterForVisualCommonsenseReasoning(cfg, IMG_DIM)
    batch = vcr_batch(cfg)
    with pytest.raises(ValueError, match="need init_word_embedding"):
        m(batch)
    m.init_word_embedding(N_SPECIAL)
    with pytest.raises(ValueError, match="txt_type_ids out of range \\[0, 2\\)"):
        m(batch)
    m.init_type_embedding()
    m(batch)
    batch["input_ids"][0, 0] = cfg.vocab_size + N_SPECIAL
    with pytest.raises(ValueError, match=f"input_ids out of range \\[0, {cfg.vocab_size + N_SPECIAL}\\)"):
        m(batch)


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrc-kl"])
def test_second_stage_vcr_pretraining_matches_transcription(task):
    torch.manual_seed(6)
    cfg = tiny_cfg()
    m = jitter(vcr_model(UniterForPretrainingForVCR, cfg, LABEL_DIM)).eval()
    g = torch.Generator().manual_seed(3)
    txt, nbb = [5, 2, 9, 7], [4, 7, 1, 3]
    batch = make_batch(task, cfg.vocab_size + N_SPECIAL, IMG_DIM, LABEL_DIM, txt, nbb, gen=g)
    types = torch.zeros_like(batch["input_ids"])
    for i, t in enumerate(txt):
        types[i, :t] = torch.randint(0, 4, (t,), generator=g)
    batch["txt_type_ids"] = types
    sd = sd_of(m)
    with torch.no_grad(), ops.use_backend("reference"):
        got = m(batch, task.replace("mrc-kl", "mrckl") if task == "mrc-kl" else task)
    close(got, orc.pretrain_vcr_forward(sd, cfg, batch, task))
    with pytest.raises(ValueError, match="invalid task 'itm'"):
        m(batch, "itm")


def test_bf16_model_scores_close_to_fp32():
    torch.manual_seed(8)
    cfg = tiny_cfg()
    m = jitter(UniterForImageTextRetrieval(cfg, IMG_DIM)).eval()
    batch = itm_batch(cfg, TXT, NBB)
    with torch.no_grad():
        ref = m(batch, compute_loss=False)
        got = m.to(torch.bfloat16)(batch, compute_loss=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)
