"""Retrieval evaluation: UNITER's recall metric against a brute-force computation, the fast
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
def _retrieval_ids(n_img, caps, seed):
    rng = np.random.default_rng(seed)
    img_ids = [f"im{j}" for j in range(n_img)]
    txt2img, img2txts, txt_ids = {}, {}, []
    for j, img in enumerate(img_ids):
        for c in range(caps if isinstance(caps, int) else int(rng.integers(*caps))):
            t = f"t{j}_{c}"
            txt_ids.append(t)
            txt2img[t] = img
            img2txts.setdefault(img, []).append(t)
    order = rng.permutation(len(txt_ids))      # rows in any order (gathered shards)
    return [txt_ids[k] for k in order], img_ids, txt2img, img2txts


@pytest.mark.parametrize("n_img,caps,seed", [(13, (1, 5), 0), (40, 5, 1), (7, (1, 3), 2),
                                             (25, 1, 3)])
def test_itm_eval_matches_brute_force(n_img, caps, seed):
    txt_ids, img_ids, t2i, i2t = _retrieval_ids(n_img, caps, seed)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(txt_ids), n_img, generator=g)
    # make the metric non-trivial: boost each caption's own image
    for r, t in enumerate(txt_ids):
        scores[r, img_ids.index(t2i[t])] += 1.5
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    want = orc.itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0 < got["img_r1"] < 1.5 and 0 < got["txt_r10"] <= 1
    # an fp16 score matrix (the original's dtype) with distinct values (integers <= 2048 are
    # exact in fp16) gives the same ranks
    if scores.numel() <= 2048:
        distinct = torch.randperm(scores.numel(), generator=g).view_as(scores).to(torch.float16)
        got16 = itm_eval(distinct, txt_ids, img_ids, t2i, i2t)
        assert got16 == pytest.approx(orc.itm_eval(distinct.float(), txt_ids, img_ids, t2i,
                                                   i2t))


def test_itm_eval_counts_the_first_rows_like_the_original():
    """The original's (rank < k).sum() over nonzero() (row, position) pairs: row 0 with its
    image at position 3 adds 1/n to img_r1 (and rows < 5 / < 10 to r5 / r10)."""
    n = 12
    txt_ids = [f"t{i}" for i in range(n)]
    img_ids = [f"i{i}" for i in range(n)]
    t2i = dict(zip(txt_ids, img_ids))
    i2t = {i: [t] for t, i in t2i.items()}
    scores = torch.eye(n) * 10 + torch.arange(n * n, dtype=torch.float).view(n, n) / 1000
    scores[0, 0] = 5.0
    scores[0, [5, 6, 7]] = torch.tensor([9.0, 8.0, 7.0])      # row 0: its image at position 3
    assert torch.argsort(scores[0], descending=True).tolist().index(0) == 3
    got = itm_eval(scores, txt_ids, img_ids, t2i, i2t)
    # hits (row, position): (0, 3) and (r, 0) for r >= 1
    assert got["img_r1"] == pytest.approx((11 + 1) / n)       # positions < 1, plus row 0
    assert got["img_r5"] == pytest.approx((12 + 5) / n)       # all positions, plus rows 0..4
    assert got["img_r10"] == pytest.approx((12 + 10) / n)
    assert got["txt_r1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="score_matrix must be"):
        itm_eval(scores[:3], txt_ids, img_ids, t2i, i2t)
    with pytest.raises(ValueError, match="not in txt_ids"):
        itm_eval(scores[:-1], txt_ids[:-1], img_ids, t2i, i2t)


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
    assert res["eval"] == pytest.approx(orc.itm_eval(single[order], res["ids"], full.all_img_ids,
                                                     full.txt2img, full.img2txts))
    # without a process group the gather is the identity
    s, ids = gather_score_matrix(single, full.ids)
    assert s is single and ids == full.ids
