"""Full-ranking image-text retrieval evaluation: every (caption, image) pair scored.

Fast path: ``uniter_fast.eval.itr.itr_score_matrix`` (text and image embeddings once per
caption / image, pairs batched by joint length, no per-batch host sync, [CLS]-only last
layer) from raw per-image features.  Baselines, same model, same precision, same run:

* ``reference``: the original ``utils/itm_eval.py`` loop structure (per caption, one
  forward per mini-batch of images sorted by box count, ``model(batch,
  compute_loss=False)``) on the reference ops; its mini-batches are collated before timing
  (the original's DataLoader collation, H2D copies included, are not counted);
* ``loop+auto``: the same loop on the fast ops (what the op layer alone gives).

Reports pairs/s (and real tokens/s).  CPU: the tiny config (2 layers, hidden 64) with
UNITER's 2048-d region features, fp32.  CUDA: UNITER-base, bf16 autocast on both sides,
the original's 400-image mini-batches.
"""
import contextlib
import functools

import benchutil as bu
import pytest
import torch

import uniter_fast
from uniter_fast import ops
from uniter_fast.eval.itr import itr_score_matrix
from uniter_fast.model import UniterForImageTextRetrieval

if bu.SMOKE:
    CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    N_TXT, N_IMG, TXT, NBB, IMG_DIM, MINI = 5, 6, (3, 9), (2, 7), 16, 4
elif bu.ON_CUDA:
    CONFIG = "uniter-base"
    N_TXT, N_IMG, TXT, NBB, IMG_DIM, MINI = 32, 800, (8, 40), (10, 100), 2048, 400
else:
    CONFIG = "uniter-tiny"
    N_TXT, N_IMG, TXT, NBB, IMG_DIM, MINI = 24, 48, (8, 30), (10, 36), 2048, 24

AMP = torch.bfloat16 if bu.ON_CUDA else None


@functools.lru_cache(maxsize=None)
def model():
    torch.manual_seed(0)
    cfg = uniter_fast.UniterConfig.from_pretrained_name(CONFIG) if isinstance(CONFIG, str) \
        else uniter_fast.UniterConfig(**CONFIG)
    m = UniterForImageTextRetrieval(cfg, IMG_DIM).to(bu.DEVICE).eval()
    m.validate_inputs = False       # the original model has no input checks
    return m


@functools.lru_cache(maxsize=None)
def data():
    """Captions ([CLS] .. [SEP]) and images (features, boxes) on the host, random lengths
    within the ranges, the longest reaching each range's top."""
    g = torch.Generator().manual_seed(0)
    vocab = model().config.vocab_size
    tl = torch.randint(TXT[0], TXT[1] + 1, (N_TXT,), generator=g)
    tl[0] = TXT[1]
    nb = torch.randint(NBB[0], NBB[1] + 1, (N_IMG,), generator=g)
    nb[0] = NBB[1]
    texts = [torch.randint(5, vocab, (int(n),), generator=g) for n in tl]
    images = []
    for n in nb:
        n = int(n)
        box = torch.rand(n, 6, generator=g)
        pos = torch.cat([box, box[:, 4:5] * box[:, 5:6]], dim=1)
        images.append((torch.randn(n, IMG_DIM, generator=g).half().float(), pos))
    return texts, images


@functools.lru_cache(maxsize=None)
def loop_batches():
    """The original's per-caption mini-batches (images sorted by box count, one caption per
    batch), on the device; the image tensors are shared between captions."""
    texts, images = data()
    order = sorted(range(len(images)), key=lambda j: images[j][0].size(0))
    dev = bu.DEVICE
    groups = []
    for st in range(0, len(order), MINI):
        idx = order[st:st + MINI]
        nbbs = [images[j][0].size(0) for j in idx]
        feat = torch.zeros(len(idx), max(nbbs), IMG_DIM)
        pos = torch.zeros(len(idx), max(nbbs), 7)
        for r, j in enumerate(idx):
            feat[r, :nbbs[r]], pos[r, :nbbs[r]] = images[j]
        groups.append((idx, nbbs, feat.to(dev), pos.to(dev)))
    per_text = []
    for t in texts:
        tl = t.numel() + 2
        ids = torch.cat([torch.tensor([2]), t, torch.tensor([3])])
        batches = []
        for idx, nbbs, feat, pos in groups:
            n, out = len(idx), tl + max(nbbs)
            attn = torch.zeros(n, out, dtype=torch.long)
            gi = torch.arange(out).repeat(n, 1)
            for r, k in enumerate(nbbs):
                attn[r, :tl + k] = 1
                gi[r, tl:tl + k] = torch.arange(tl, tl + k)
            batches.append((idx, {"input_ids": ids.expand(n, -1).to(dev),
                                  "position_ids": torch.arange(tl, device=dev)[None],
                                  "img_feat": feat, "img_pos_feat": pos,
                                  "attn_masks": attn.to(dev), "gather_index": gi.to(dev)}))
        per_text.append(batches)
    return per_text


def _amp():
    return torch.autocast(bu.DEVICE.type, dtype=AMP) if AMP else contextlib.nullcontext()


def run_loop(engine):
    """The original ``inference`` loop: per caption, per image mini-batch, one forward."""
    m = model()
    per_text = loop_batches()
    def run():
        out = torch.zeros(len(per_text), N_IMG, device=bu.DEVICE)
        ctx = contextlib.nullcontext() if engine == "auto" else ops.use_backend(engine)
        with torch.no_grad(), ctx, _amp():
            for i, batches in enumerate(per_text):
                for idx, batch in batches:
                    out[i, idx] = m(batch, compute_loss=False).view(-1).float()
        return out
    return run


def run_fast():
    m = model()
    texts, images = data()
    full = [torch.cat([torch.tensor([2]), t, torch.tensor([3])]) for t in texts]

    def run():
        return itr_score_matrix(m, full, images, amp_dtype=AMP)
    return run


def test_itr_full_ranking_eval(benchmark, collector):
    fast, loop_ref, loop_auto = run_fast(), run_loop("reference"), run_loop("auto")
    got, want = fast(), loop_ref()
    tol = 5e-2 if AMP else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)   # same scores before timing
    precision = "bf16-autocast" if AMP else "fp32"
    benchmark.group = f"itr full ranking {N_TXT}x{N_IMG} {precision} {bu.DEVICE.type}"
    timing = bu.measure(benchmark, fast, {"reference": loop_ref, "loop+auto": loop_auto},
                        min_rounds=3, max_rounds=20 if bu.ON_CUDA else 5)
    texts, images = data()
    pairs = N_TXT * N_IMG
    tokens = sum((t.numel() + 2) * N_IMG for t in texts) + sum(f.size(0) for f, _ in images) * N_TXT
    cfg = model().config
    rec = bu.make_record(
        op="itr_eval", group=benchmark.group, mode="fwd", backend="auto",
        dtype=AMP or torch.float32,
        shape={"texts": N_TXT, "images": N_IMG, "txt_len": list(TXT), "num_bb": list(NBB),
               "img_dim": IMG_DIM, "mini_batch": MINI,
               "config": CONFIG if isinstance(CONFIG, str) else "smoke",
               "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
               "precision": precision},
        timing=timing, headline=True, tokens=tokens, peak_mem_bytes=bu.cuda_peak_bytes(fast),
        notes="pairs/s: itr_score_matrix vs the original per-caption loop (mini-batches "
              "collated before timing) on reference ops and on the fast ops")
    rec["pairs"] = pairs
    rec["pairs_per_s"] = pairs / rec["median_s"]
    rec["baseline_pairs_per_s"] = {k: pairs / v["median_s"] for k, v in rec["baselines"].items()}
    bu.attach(benchmark, rec)
    benchmark.extra_info["pairs_per_s"] = rec["pairs_per_s"]
    collector.add(rec)


if __name__ == "__main__":
    pytest.main([__file__, "--benchmark-only", "-q"])
