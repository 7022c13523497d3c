"""Retrieval evaluation: the per-query recall metric against plain loops (order and rank-count
invariance, ties, the original's counting as a reference), the fast
full-ranking scorer against the original's per-caption loop, its batching and its host
syncs, and the score-matrix gather with unequal rows on 2 CPU ranks (gloo)."""
import os
import shutil

import numpy as np
import oracle_itr_re_vcr as orc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uniter_fast
from uniter_fast import UniterConfig, UniterForPretraining, ops
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb, write_img_db, write_txt_db
from uniter_fast.data.itm import ItmEvalDataset
from uniter_fast.eval import itr as itr_mod
from uniter_fast.eval.itr import (
    gather_score_matrix,
    itm_dataset_scores,
    itm_eval,
    itm_loop_scores,
    itr_score_matrix,
)
from uniter_fast.model import UniterForImageTextRetrieval

D = 24
META = {"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 120], "bert": "t"}


# ----------------------------------------------------------------------------- metric
KS = (1, 5, 10)


def _retrieval_ids(n_img, caps, seed):
    rng = np.random.default_rng(seed)
    img_ids = [f"im{j}" for j in range(n_img)]
    txt2img, img2txts, txt_ids = {}, {}, []
    for j, img in enumerate(img_ids):
        img2txts[img] = []
        for c in range(caps if isinstance(caps, int) else int(rng.integers(*caps))):
            t = f"t{j}_{c}"
            txt_ids.append(t)
            txt2img[t] = img
            img2txts[img].append(t)
    order = rng.permutation(len(txt_ids))      # rows in any order (gathered shards)
    return [txt_ids[k] for k in order], img_ids, txt2img, img2txts


def _random_case(n_img, caps, seed, ties=False):
    """ids and a score matrix; ``ties``: scores from a few integer levels (many ties)."""
    txt_ids, img_ids, t2i, i2t = _retrieval_ids(n_img, caps, seed)
    g = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(0, 3, (len(txt_ids), n_img), generator=g).float()
    else:
        scores = torch.randn(len(txt_ids), n_img, generator=g)
    # make the metric non-trivial: boost each caption's own image
    for r, t in enumerate(txt_ids):
        scores[r, img_ids.index(t2i[t])] += 1.0 if ties else 1.5
    return scores, txt_ids, img_ids, t2i, i2t


def plain_recalls(scores, txt_ids, img_ids, txt2img, img2txts):
    """The per-query recall@k by plain loops over a list copy of the matrix: a query hits at
    k when fewer than k candidates score strictly higher than its best ground truth (NaN:
    never higher; a query with only NaN ground truths misses)."""
    s = scores.double().tolist()
    n_t, n_i = len(txt_ids), len(img_ids)
    ir = [0, 0, 0]
    for r, t in enumerate(txt_ids):                 # image retrieval: caption queries
        g = s[r][img_ids.index(txt2img[t])]
        if g != g:
            continue
        higher = 0
        for j in range(n_i):
            if s[r][j] > g:
                higher += 1
        for q, k in enumerate(KS):
            if higher < k:
                ir[q] += 1
    tr = [0, 0, 0]
    for j, img in enumerate(img_ids):               # text retrieval: image queries
        gts = [s[txt_ids.index(t)][j] for t in img2txts[img]]
        gts = [g for g in gts if g == g]
        if not gts:
            continue
        g = max(gts)
        higher = 0
        for r in range(n_t):
            if s[r][j] > g:
                higher += 1
        for q, k in enumerate(KS):
            if higher < k:
                tr[q] += 1
    tr = [c / n_i for c in tr]
    ir = [c / n_t for c in ir]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tm,
            "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": im,
            "r_mean": (tm + im) / 2}


def original_img_recalls(score_matrix, txt_ids, img_ids, txt2img):
    """Reference only: the original ``utils/itm_eval.py`` image retrieval, as it was written
    (``topk(10)``, cut here to the columns there are, then ``(rank < k).sum()`` over the
    ``nonzero()`` (row, position) pairs: the row index is counted as well)."""
    img2j = {i: j for j, i in enumerate(img_ids)}
    _, rank_txt = score_matrix.topk(min(10, len(img_ids)), dim=1)
    gt = torch.tensor([img2j[txt2img[t]] for t in txt_ids]).unsqueeze(1).expand_as(rank_txt)
    rank = (rank_txt == gt).nonzero()
    return [float((rank < k).sum()) / len(txt_ids) for k in KS]


CASES = [(1, 2, 0), (1, 1, 1), (2, 1, 2), (1, 7, 3), (3, 4, 4), (13, (1, 5), 5),
         (40, 5, 6), (7, (1, 3), 7), (25, 1, 8), (11, (0, 3), 9), (31, (1, 4), 10)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_img,caps,seed", CASES)
def test_itm_eval_is_the_per_query_recall(n_img, caps, seed, ties):
    scores, txt_ids, img_ids, t2i, i2t = _random_case(n_img, caps, seed, ties)
    if not txt_ids:
        pytest.skip("no captions drawn")
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    want = plain_recalls(scores, txt_ids, img_ids, t2i, i2t)
    assert got == want
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got["img_r1"] <= got["img_r5"] <= got["img_r10"]
    assert got["txt_r1"] <= got["txt_r5"] <= got["txt_r10"]
    # the same figures from a float64 / fp16 copy (exact here: small integers or the same
    # order), and text retrieval equals the original's where there are no ties (its
    # definition is already per query)
    assert itm_eval(scores.double(), txt_ids, img_ids, t2i, i2t) == got
    if ties:
        assert itm_eval(scores.half(), txt_ids, img_ids, t2i, i2t) == got
    else:
        orig = orc.itm_eval(scores, txt_ids, img_ids, t2i, i2t)
        for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean"):
            assert got[k] == pytest.approx(orig[k], abs=1e-12), k


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_img,caps,seed", [(1, 2, 0), (3, 4, 4), (13, (1, 5), 5),
                                             (40, 5, 6), (31, (1, 4), 10)])
def test_itm_eval_invariant_to_text_and_image_order(n_img, caps, seed, ties):
    scores, txt_ids, img_ids, t2i, i2t = _random_case(n_img, caps, seed, ties)
    want = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(5):
        pr = torch.randperm(len(txt_ids), generator=g).tolist()
        pc = torch.randperm(n_img, generator=g).tolist()
        got = itm_eval(scores[pr][:, pc], [txt_ids[r] for r in pr], [img_ids[c] for c in pc],
                       t2i, i2t)
        assert got == want


@pytest.mark.parametrize("n_img,caps,seed", [(13, (1, 5), 5), (40, 5, 6), (7, (1, 3), 7),
                                             (1, 3, 0), (31, (1, 4), 10)])
@pytest.mark.parametrize("ties", [False, True])
def test_itm_eval_equal_at_rank_counts_1_2_and_3(n_img, caps, seed, ties):
    """Validation on W ranks: rank k scores the captions ``ids[k::W]``
    (``ItmEvalDataset``), and :func:`gather_score_matrix` concatenates the shards in rank
    order.  The metric of the gathered matrix equals the 1-process one exactly."""
    scores, txt_ids, img_ids, t2i, i2t = _random_case(n_img, caps, seed, ties)
    single = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    for world in (2, 3):
        order = [r for k in range(world) for r in range(k, len(txt_ids), world)]
        gathered = torch.cat([scores[k::world] for k in range(world)])
        assert torch.equal(gathered, scores[order])
        got = itm_eval(gathered, [txt_ids[r] for r in order], img_ids, t2i, i2t)
        assert got == single, world
    # the original's image recall is not rank-count invariant in general; ours is


def test_itm_eval_one_image_two_captions_is_a_recall_not_a_count():
    """``infer --task itm`` on one image with two captions printed image R5 200.00 with the
    original's counting; the recall is 1.0 for every k."""
    scores = torch.tensor([[0.3], [-1.2]])
    args = (["a", "b"], ["i"], {"a": "i", "b": "i"}, {"i": ["a", "b"]})
    got = itm_eval(scores, *args)
    assert got == {k: 1.0 for k in got}
    assert original_img_recalls(scores, *args[:3]) == [1.5, 2.0, 2.0]


def test_itm_eval_original_counting_differs_and_depends_on_caption_order():
    """Documents the original's ``(rank < k).sum()`` over ``nonzero()`` (row, position)
    pairs: a hit in row r also counts ``r < k``, so its image recall exceeds the recall by up
    to k / #captions, and moving the one caption that misses changes it."""
    n = 12
    txt_ids = [f"t{i}" for i in range(n)]
    img_ids = [f"i{i}" for i in range(n)]
    t2i = dict(zip(txt_ids, img_ids))
    i2t = {i: [t] for t, i in t2i.items()}
    scores = torch.eye(n) * 10 + torch.arange(n * n, dtype=torch.float).view(n, n) / 1000
    scores[0, 0] = -5.0                   # caption 0: its image last (position 11)
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    assert [got[f"img_r{k}"] for k in KS] == [11 / n] * 3
    assert got == plain_recalls(scores, txt_ids, img_ids, t2i, i2t)
    # the original: hits (r, 0) for rows 1..11, plus rows 1..k-1
    assert original_img_recalls(scores, txt_ids, img_ids, t2i) == [11 / n, 15 / n, 20 / n]
    assert orc.itm_eval(scores, txt_ids, img_ids, t2i, i2t)["img_r5"] == pytest.approx(15 / n)
    # the missing caption moved to the last row: the original's figures change, ours not
    pr = list(range(1, n)) + [0]
    moved = (scores[pr], [txt_ids[r] for r in pr], img_ids, t2i)
    assert original_img_recalls(*moved) == [12 / n, 16 / n, 21 / n]
    assert itm_eval(*moved, i2t) == got


def test_itm_eval_ties_count_for_the_query():
    """Hit at k: fewer than k candidates score strictly higher than the (best) ground truth."""
    scores = torch.tensor([[1.0, 1.0, 1.0],       # t0 (image a): tied with both others
                           [2.0, 2.0, 0.0],       # t1 (image b): tied with a
                           [0.0, 5.0, 1.0],       # t2 (image c): b higher
                           [0.0, 0.0, 1.0]])      # t3 (image c)
    txt_ids, img_ids = ["t0", "t1", "t2", "t3"], ["a", "b", "c"]
    t2i = {"t0": "a", "t1": "b", "t2": "c", "t3": "c"}
    i2t = {"a": ["t0"], "b": ["t1"], "c": ["t2", "t3"]}
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    assert got["img_r1"] == 3 / 4 and got["img_r5"] == 1.0        # only t2 misses at 1
    # columns: a: t0 (1) below t1 (2): 1 higher; b: t1 (2) below t2 (5); c: best 1, none higher
    assert got["txt_r1"] == 1 / 3 and got["txt_r5"] == 1.0
    assert got == plain_recalls(scores, txt_ids, img_ids, t2i, i2t)
    # an all-equal matrix: every query hits at every k
    flat = torch.zeros(4, 3)
    assert set(itm_eval(flat, txt_ids, img_ids, t2i, i2t).values()) == {1.0}


def test_itm_eval_nan_and_empty_image():
    txt_ids, img_ids = ["t0", "t1", "t2"], ["a", "b", "c"]
    t2i = {"t0": "a", "t1": "b", "t2": "b"}
    i2t = {"a": ["t0"], "b": ["t1", "t2"], "c": []}           # image c: no caption
    nan = float("nan")
    scores = torch.tensor([[nan, 0.0, 0.0],      # t0: its image NaN -> miss
                           [nan, 1.0, nan],      # t1: NaN candidates never outrank
                           [0.0, nan, 1.0]])     # t2: its image NaN -> miss
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    assert got == plain_recalls(scores, txt_ids, img_ids, t2i, i2t)
    assert [got[f"img_r{k}"] for k in KS] == [1 / 3] * 3
    # a: only NaN ground truth -> miss; b: best 1.0 (t1), nothing higher; c: no caption
    assert [got[f"txt_r{k}"] for k in KS] == [1 / 3] * 3
    assert set(itm_eval(torch.full((3, 3), nan), txt_ids, img_ids, t2i, i2t).values()) == {0.0}


def test_itm_eval_input_errors():
    txt_ids, img_ids = ["t0", "t1"], ["a", "b"]
    t2i = {"t0": "a", "t1": "b"}
    i2t = {"a": ["t0"], "b": ["t1"]}
    scores = torch.randn(2, 2)
    with pytest.raises(ValueError, match="score_matrix must be"):
        itm_eval(scores[:1], txt_ids, img_ids, t2i, i2t)
    with pytest.raises(ValueError, match="score_matrix must be"):
        itm_eval(scores.view(-1), txt_ids, img_ids, t2i, i2t)
    with pytest.raises(ValueError, match="at least one caption and one image"):
        itm_eval(torch.zeros(0, 2), [], img_ids, t2i, i2t)
    with pytest.raises(ValueError, match="at least one caption and one image"):
        itm_eval(torch.zeros(2, 0), txt_ids, [], t2i, i2t)
    with pytest.raises(ValueError, match="at least one caption and one image"):
        itm_eval(torch.zeros(0, 0), [], [], {}, {})
    with pytest.raises(ValueError, match="not in txt_ids"):
        itm_eval(scores[:1], txt_ids[:1], img_ids, t2i, i2t)
    with pytest.raises(ValueError, match="has no column"):
        itm_eval(scores[:, :1], txt_ids, img_ids[:1], t2i, {"a": ["t0"]})
    with pytest.raises(ValueError, match="no img2txts entry"):
        itm_eval(scores, txt_ids, img_ids, t2i, {"a": ["t0"]})
    with pytest.raises(ValueError, match="must not repeat"):
        itm_eval(scores, ["t0", "t0"], img_ids, t2i, i2t)
    # integer scores are accepted (compared exactly)
    assert itm_eval(torch.tensor([[2, 1], [0, 3]]), txt_ids, img_ids, t2i, i2t)["r_mean"] == 1.0


def test_itm_eval_chunked_rows_equal_unchunked(monkeypatch):
    scores, txt_ids, img_ids, t2i, i2t = _random_case(13, (1, 5), 5, ties=True)
    want = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    monkeypatch.setattr(itr_mod, "_EVAL_CHUNK", 20)         # 1 row per chunk at 13 images
    assert itm_eval(scores, txt_ids, img_ids, t2i, i2t) == want


# ----------------------------------------------------------------------------- scorer
@pytest.fixture(scope="module")
def eval_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("itr")
    rng = np.random.default_rng(0)
    recs, dumps = {}, {}
    for j in range(10):      # 19 captions: shards of 10 and 9
        for c in range(1 + j % 3):
            recs[f"t{j}_{c}"] = {"input_ids": rng.integers(5, 120, 1 + (j * 3 + c) % 11).tolist(),
                                 "img_fname": f"img{j}.npz"}
        n = 2 + (j * 5) % 9
        dumps[f"img{j}.npz"] = {"features": rng.standard_normal((n, D)).astype(np.float32),
                                "norm_bb": rng.random((n, 6)).astype(np.float32),
                                "conf": np.linspace(0.95, 0.05, n).astype(np.float32)}
    write_txt_db(str(root / "txt.db"), recs, META)
    write_img_db(str(root / "img"), dumps, conf_th=0.2, max_bb=8, min_bb=2)
    return str(root / "txt.db"), str(root / "img")


def _dataset(eval_db, **kw):
    txt, img = eval_db
    return ItmEvalDataset(TxtTokLmdb(txt, -1), DetectFeatLmdb(img, 0.2, 8, 2),
                          mini_batch_size=4, **kw)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    m = UniterForImageTextRetrieval(cfg, D)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("max_tokens", [1, 37, 4096])
def test_fast_scorer_matches_the_original_loop(eval_db, max_tokens):
    ds = _dataset(eval_db)
    m = tiny_model().train()        # dropout in the config: the scorer must switch it off
    with ops.use_backend("reference"):
        want = itm_loop_scores(m, ds)
    done = []
    got = itm_dataset_scores(m, ds, max_tokens=max_tokens, progress=done.append)
    assert m.training                            # restored
    assert got.shape == (len(ds.ids), len(ds.all_img_ids)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(done) == got.numel()
    assert want.std() > 0.01                     # the scores do differ between pairs


def test_fast_scorer_zero_shot_from_pretraining_model_and_bf16(eval_db):
    ds = _dataset(eval_db)
    torch.manual_seed(1)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    pre = UniterForPretraining(cfg, D, 5)
    itr = UniterForImageTextRetrieval(cfg, D)
    itr.load_state_dict({k: v for k, v in pre.state_dict().items() if k in itr.state_dict()},
                        strict=False)
    itr.init_output()
    a = itm_dataset_scores(pre, ds)
    b = itm_dataset_scores(itr, ds)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    c = itm_dataset_scores(itr, ds, amp_dtype=torch.bfloat16)
    torch.testing.assert_close(c, b, rtol=0.05, atol=0.05)
    assert itm_dataset_scores(itr, ds, out_dtype=torch.float16).dtype == torch.float16


def test_fast_scorer_batches_cover_every_pair_once_with_little_padding():
    rng = np.random.default_rng(0)
    tl = rng.integers(3, 40, 57)
    nb = rng.integers(10, 100, 31)
    seen = np.zeros((57, 31), dtype=int)
    real = padded = 0
    for t, i, length in itr_mod._batches(tl, nb, 2048):
        joint = tl[t] + nb[i]
        assert joint.max() == length and (len(t) == 1 or len(t) * length <= 2048)
        seen[t, i] += 1
        real += int(joint.sum())
        padded += len(t) * length
    assert (seen == 1).all()
    assert padded / real < 1.02          # sorted by joint length: ~no padding


def test_fast_scorer_has_no_host_sync_per_batch(eval_db, monkeypatch):
    """The calls that read a tensor's value on the host are the same whatever the number of
    batches (the pairs' indices are built on the host from the lengths)."""
    ds = _dataset(eval_db)
    m = tiny_model()
    counts = {}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return wrapped

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    per_run = []
    for max_tokens in (16, 4096):
        counts.clear()
        n_batches = sum(1 for _ in itr_mod._batches(
            np.array([len(ds.txt_db[t]["input_ids"]) + 2 for t in ds.ids]),
            np.array([ds.img_db.nbb(i) for i in ds.all_img_ids]), max_tokens))
        itm_dataset_scores(m, ds, max_tokens=max_tokens)
        per_run.append((n_batches, dict(counts)))
    (nb_small, c_small), (nb_big, c_big) = per_run
    assert nb_small > 10 * nb_big
    assert c_small == c_big


def test_fast_scorer_input_errors(eval_db):
    m = tiny_model()
    img = [(torch.randn(3, D), torch.rand(3, 7))]
    with pytest.raises(ValueError, match="text 1 must be a non-empty"):
        itr_score_matrix(m, [torch.tensor([2, 5, 3]), torch.tensor([], dtype=torch.long)], img)
    with pytest.raises(ValueError, match="out of range \\[0, 128\\)"):
        itr_score_matrix(m, [torch.tensor([2, 500, 3])], img)
    with pytest.raises(ValueError, match="image 0: expected features \\[n >= 1, 24\\]"):
        itr_score_matrix(m, [torch.tensor([2, 5, 3])], [(torch.randn(3, 7), torch.rand(3, 7))])
    bad = torch.randn(3, D)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="image 0: features or boxes contain NaN"):
        itr_score_matrix(m, [torch.tensor([2, 5, 3])], [(bad, torch.rand(3, 7))])
    with pytest.raises(ValueError, match="neither rank_output"):
        itr_score_matrix(m.uniter, [torch.tensor([2, 5, 3])], img)


# ----------------------------------------------------------------------------- gather (2 ranks)
def _gather_worker(rank, world, init_file, eval_db, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        # unequal rows: 3 on rank 0, 5 on rank 1
        n = 3 if rank == 0 else 5
        local = torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 100 * rank
        ids = [f"r{rank}_{i}" for i in range(n)]
        got, got_ids = gather_score_matrix(local, ids)
        want = torch.cat([torch.arange(12.).view(3, 4), torch.arange(20.).view(5, 4) + 100])
        assert torch.equal(got, want), got
        assert got_ids == [f"r0_{i}" for i in range(3)] + [f"r1_{i}" for i in range(5)]
        # an empty shard is fine too
        mine = (local, ids) if rank == 0 else (local[:0], [])
        got, got_ids = gather_score_matrix(*mine)
        assert torch.equal(got, want[:3]) and got_ids == [f"r0_{i}" for i in range(3)]
        # column counts must agree (every rank raises)
        try:
            gather_score_matrix(torch.zeros(2, 4 + rank), ["a", "b"])
        except ValueError as e:
            assert "different numbers of images" in str(e)
        else:
            raise AssertionError("no error for mismatched columns")
        # the real thing: each rank scores its shard of the captions, gather, metric
        ds = _dataset(eval_db, rank=rank, world_size=world)
        scores = itm_dataset_scores(tiny_model(), ds)
        all_scores, all_ids = gather_score_matrix(scores, ds.ids)
        if rank == 0:
            torch.save({"scores": all_scores, "ids": all_ids,
                        "eval": itm_eval(all_scores, all_ids, ds.all_img_ids, ds.txt2img,
                                         ds.img2txts)}, os.path.join(out_dir, "gathered.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_unequal_rows_on_two_gloo_ranks(eval_db, tmp_path):
    # a copy of the dbs this process has not opened: LMDB refuses, in a forked child, an
    # environment its parent holds open
    eval_db = tuple(shutil.copytree(p, str(tmp_path / os.path.basename(p))) for p in eval_db)
    # fork: the children need no fresh interpreter (and re-import of torch)
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), eval_db, str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    res = torch.load(tmp_path / "gathered.pt")
    full = _dataset(eval_db)
    assert len(full.ids) % 2 == 1                       # the two shards differ in size
    assert res["ids"] == full.ids[0::2] + full.ids[1::2]
    single = itm_dataset_scores(tiny_model(), full)
    order = [full.ids.index(t) for t in res["ids"]]
    torch.testing.assert_close(res["scores"], single[order], rtol=1e-5, atol=1e-5)
    assert res["eval"] == plain_recalls(res["scores"], res["ids"], full.all_img_ids,
                                        full.txt2img, full.img2txts)
    # the gathered matrix in the 1-process row order gives the same figures exactly
    back = [res["ids"].index(t) for t in full.ids]
    assert itm_eval(res["scores"][back], full.ids, full.all_img_ids, full.txt2img,
                    full.img2txts) == res["eval"]
    # without a process group the gather is the identity
    s, ids = gather_score_matrix(single, full.ids)
    assert s is single and ids == full.ids
