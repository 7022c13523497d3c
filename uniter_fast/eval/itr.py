"""Image-text retrieval evaluation: full-ranking score matrix, its gather across ranks and
UNITER's recall metric (``utils/itm_eval.py``).

* :func:`itr_score_matrix` scores every (caption, image) pair with a retrieval model (its
  ``rank_output``) or a pretraining model (zero-shot: its ITM head's "match" logit), fast:

  - each caption's text embeddings and each image's region embeddings (the 2048 -> H
    projection, box features, layer norms) are computed **once** and kept packed on the
    device; a batch of pairs is gathered from them by index;
  - pairs are **batched by joint length** (within chunks of captions, all pairs sorted by
    caption length + box count and cut into batches of about ``max_tokens`` tokens), so
    there is almost no padding;
  - every index is built on the host from the lengths, so there is **no host sync per
    batch or pair**; scores are written into the device matrix by index;
  - the last layer runs for the [CLS] query only (the pooler reads nothing else);
  - ``amp_dtype`` (e.g. ``torch.bfloat16`` on GPU) runs the encoder under autocast.

  The scores equal the model's own ``forward(batch, compute_loss=False)`` on the
  original's batches (:func:`itm_loop_scores`, the original's per-caption loop) up to
  float rounding.
* :func:`gather_score_matrix`: every rank's rows (this rank's captions against all
  images) gathered in rank order when ranks hold different numbers of rows: pad,
  ``all_gather``, trim (gloo and NCCL).
* :func:`itm_eval`: text and image R@1/5/10, their means and the overall mean, exactly as
  the original computes them (see its notes).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data.datasets import img_pos_feat

__all__ = ["itm_eval", "gather_score_matrix", "itr_score_matrix", "itm_dataset_scores",
           "itm_loop_scores", "score_head", "DatasetImages", "RECALL_KS"]

#: the recalls UNITER reports
RECALL_KS = (1, 5, 10)
#: pairs whose schedule is built at once (host arrays of this many entries)
_PAIRS_PER_CHUNK = 1 << 22
#: texts / images embedded per forward of the embedding layers
_EMBED_CHUNK = 256


# ----------------------------------------------------------------------------- metric
@torch.no_grad()
def itm_eval(score_matrix: torch.Tensor, txt_ids: Sequence[str], img_ids: Sequence[str],
             txt2img: Mapping[str, str], img2txts: Mapping[str, Sequence[str]]
             ) -> Dict[str, float]:
    """UNITER's retrieval recalls from ``score_matrix`` [len(txt_ids), len(img_ids)].

    Image retrieval (``img_r*``): for each caption, whether its image (``txt2img``) is in
    the top k of its row.  Text retrieval (``txt_r*``): for each image, whether one of its
    captions (``img2txts``) is in the top k of its column.  Means: ``txt_r_mean``,
    ``img_r_mean`` (of the three recalls) and ``r_mean`` (of the two means).

    As in the original, ranks come from ``topk(10)`` (ties broken as ``topk`` breaks
    them), and the image recalls are ``(rank < k).sum()`` over the ``nonzero()`` (row,
    position) pairs of the hits, so they also count each of the first k captions (rows
    0..k-1) whose image is in its top 10: at most k / len(txt_ids) above the plain recall.
    Where the original fails (fewer than 10 captions or images) the top is cut to the
    available rows/columns.  A caption whose image is not among ``img_ids``, or an image
    caption not among ``txt_ids``, raises ``ValueError``.
    """
    n_t, n_i = len(txt_ids), len(img_ids)
    if score_matrix.dim() != 2 or tuple(score_matrix.shape) != (n_t, n_i):
        raise ValueError(f"score_matrix must be [len(txt_ids)={n_t}, len(img_ids)={n_i}], got "
                         f"{tuple(score_matrix.shape)}")
    if n_t == 0 or n_i == 0:
        raise ValueError("itm_eval needs at least one caption and one image")
    dev = score_matrix.device
    img2j = {img: j for j, img in enumerate(img_ids)}
    try:
        gt_j = torch.tensor([img2j[txt2img[t]] for t in txt_ids], device=dev)
    except KeyError as e:
        raise ValueError(f"itm_eval: caption or image {e} has no column (txt2img names an "
                         "image that is not in img_ids, or a caption lacks txt2img)") from None
    top = max(RECALL_KS)
    # image retrieval
    _, rank_txt = score_matrix.topk(min(top, n_i), dim=1)
    rank = (rank_txt == gt_j[:, None]).nonzero()
    ir = [float((rank < k).sum()) / n_t if rank.numel() else 0.0 for k in RECALL_KS]
    # text retrieval
    txt2i = {t: i for i, t in enumerate(txt_ids)}
    codes = []
    for j, img in enumerate(img_ids):
        for t in img2txts[img]:
            if t not in txt2i:
                raise ValueError(f"itm_eval: caption {t!r} of image {img!r} (img2txts) is not "
                                 "in txt_ids")
            codes.append(txt2i[t] * n_i + j)
    _, rank_img = score_matrix.topk(min(top, n_t), dim=0)           # [top, n_i]
    cand = rank_img * n_i + torch.arange(n_i, device=dev)[None, :]
    hit = torch.isin(cand, torch.tensor(codes, dtype=torch.long, device=dev))
    first = torch.where(hit.any(0), hit.float().argmax(0), torch.full((n_i,), top, device=dev))
    tr = [float((first < k).sum()) / n_i for k in RECALL_KS]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    out = {f"txt_r{k}": v for k, v in zip(RECALL_KS, tr)}
    out["txt_r_mean"] = tr_mean
    out.update({f"img_r{k}": v for k, v in zip(RECALL_KS, ir)})
    out["img_r_mean"] = ir_mean
    out["r_mean"] = (tr_mean + ir_mean) / 2
    return out


# ----------------------------------------------------------------------------- gather
def gather_score_matrix(scores: torch.Tensor, txt_ids: Sequence[str], group=None
                        ) -> Tuple[torch.Tensor, List[str]]:
    """Concatenate every rank's score rows and caption ids in rank order (what the
    original's ``hvd.allgather`` + ``all_gather_list`` gave), when ranks hold different
    numbers of rows: the row counts are gathered first, each rank pads to the largest,
    ``all_gather``, and the padding is cut.  Without an initialised process group this is
    the identity.  Gloo gathers on the CPU, other backends on ``scores``' device; the
    result is on ``scores``' device on every rank."""
    if scores.dim() != 2 or scores.size(0) != len(txt_ids):
        raise ValueError(f"scores must be [len(txt_ids)={len(txt_ids)}, n_images], got "
                         f"{tuple(scores.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        return scores, list(txt_ids)
    world = dist.get_world_size(group)
    dev = torch.device("cpu") if dist.get_backend(group) == "gloo" else scores.device
    local = scores.to(dev)
    shape = torch.tensor([local.size(0), local.size(1)], dtype=torch.long, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    if len({c for _, c in shapes}) != 1:
        raise ValueError(f"gather_score_matrix: ranks have different numbers of images "
                         f"(columns per rank: {[c for _, c in shapes]})")
    m = max(r for r, _ in shapes)
    padded = local.new_zeros((m, local.size(1)))
    padded[:local.size(0)] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    out = torch.cat([b[:r] for b, (r, _) in zip(bufs, shapes)], dim=0).to(scores.device)
    ids: List[Any] = [None] * world
    dist.all_gather_object(ids, list(txt_ids), group=group)
    all_ids = [t for part in ids for t in part]
    return out, all_ids


# ----------------------------------------------------------------------------- scorer
def score_head(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [1, H], bias [1]) of the retrieval score: ``rank_output`` of a retrieval
    model, else row 1 ("match") of ``itm_output`` (zero-shot from a pretraining model)."""
    head = getattr(model, "rank_output", None)
    if isinstance(head, nn.Linear) and head.out_features == 1:
        return head.weight, head.bias
    head = getattr(model, "itm_output", None)
    if isinstance(head, nn.Linear) and head.out_features == 2:
        return head.weight[1:], head.bias[1:]
    raise ValueError(f"{type(model).__name__} has neither rank_output (Linear(H, 1)) nor "
                     "itm_output (Linear(H, 2)) to score image-text pairs with")


def _check_texts(texts: Sequence[torch.Tensor], uniter) -> List[int]:
    n_words = uniter.embeddings.word_embeddings.num_embeddings
    max_pos = uniter.config.max_position_embeddings
    lens = []
    for k, t in enumerate(texts):
        if not torch.is_tensor(t) or t.dim() != 1 or t.dtype.is_floating_point or t.numel() == 0:
            raise ValueError(f"text {k} must be a non-empty 1-D integer tensor of token ids")
        if t.numel() > max_pos:
            raise ValueError(f"text {k} has {t.numel()} tokens, more than "
                             f"max_position_embeddings={max_pos}")
        lens.append(int(t.numel()))
    if texts:
        cat = torch.cat([t.cpu() for t in texts])
        if int(cat.min()) < 0 or int(cat.max()) >= n_words:
            raise ValueError(f"text token ids out of range [0, {n_words}) of word_embeddings")
    return lens


def _pad(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), max(r.size(0) for r in rows)) + tuple(rows[0].shape[1:]))
    for k, r in enumerate(rows):
        out[k, :r.size(0)] = r
    return out


def _embed_texts(uniter, texts, lens, device) -> torch.Tensor:
    parts = []
    for st in range(0, len(texts), _EMBED_CHUNK):
        chunk = [t.to(torch.long) for t in texts[st:st + _EMBED_CHUNK]]
        ids = _pad(chunk).to(device, non_blocking=True)
        pos = torch.arange(ids.size(1), device=device).unsqueeze(0)
        emb = uniter.embeddings(ids, pos)
        valid = (torch.arange(ids.size(1))[None, :]
                 < torch.tensor(lens[st:st + _EMBED_CHUNK])[:, None]).to(device, non_blocking=True)
        parts.append(emb[valid])
    return torch.cat(parts)


def _embed_images(uniter, images, device, param_dtype, autocast_on) -> Tuple[torch.Tensor, List[int]]:
    parts, nbbs = [], []
    img_dim = uniter.img_dim
    for st in range(0, len(images), _EMBED_CHUNK):
        feats, poss = [], []
        for j in range(st, min(st + _EMBED_CHUNK, len(images))):
            feat, pos = images[j]
            if (feat.dim() != 2 or feat.size(1) != img_dim or pos.dim() != 2
                    or pos.shape != (feat.size(0), 7) or feat.size(0) == 0):
                raise ValueError(f"image {j}: expected features [n >= 1, {img_dim}] and boxes "
                                 f"[n, 7], got {tuple(feat.shape)} and {tuple(pos.shape)}")
            if not (torch.isfinite(feat).all() and torch.isfinite(pos).all()):
                raise ValueError(f"image {j}: features or boxes contain NaN or inf")
            feats.append(feat.float())
            poss.append(pos.float())
            nbbs.append(feat.size(0))
        n = nbbs[st:]
        dtype = torch.float32 if autocast_on else param_dtype
        feat = _pad(feats).to(device=device, dtype=dtype, non_blocking=True)
        pos = _pad(poss).to(device=device, dtype=dtype, non_blocking=True)
        emb = uniter._compute_img_embeddings(feat, pos)
        valid = (torch.arange(feat.size(1))[None, :] < torch.tensor(n)[:, None]).to(
            device, non_blocking=True)
        parts.append(emb[valid])
    return torch.cat(parts), nbbs


def _cls_layer(layer, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A BertLayer for the [CLS] query only (keys/values: every position): [B, 1, H]."""
    sa = layer.attention.self
    q = sa._heads(sa.query(hidden[:, :1]))
    k, v = sa._heads(sa.key(hidden)), sa._heads(sa.value(hidden))
    # one query: a plain matmul-softmax (SDPA kernels are slower at query length 1); masked
    # keys get -inf (the model's -10000 gives exp() == 0 as well; [CLS] is never masked)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.size(-1)))
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = torch.softmax(scores, dim=-1) @ v
    ctx = ctx.transpose(1, 2).reshape(hidden.size(0), 1, sa.all_head_size)
    att = layer.attention.output(ctx, hidden[:, :1])
    return layer.output(layer.intermediate(att), att)


def _batches(tl: np.ndarray, nb: np.ndarray, max_tokens: int):
    """(text index, image index, joint length) arrays of each batch: all pairs of a chunk
    of texts sorted by joint length, cut so rows x longest row <= max_tokens."""
    n_i = len(nb)
    per = max(1, _PAIRS_PER_CHUNK // n_i)
    for t0 in range(0, len(tl), per):
        joint = (tl[t0:t0 + per, None] + nb[None, :]).reshape(-1)
        order = np.argsort(joint, kind="stable")
        lens = joint[order]
        p, n = 0, len(order)
        while p < n:
            b = max(1, max_tokens // int(lens[p]))
            while b > 1 and int(lens[min(p + b, n) - 1]) * min(b, n - p) > max_tokens:
                b = max(1, max_tokens // int(lens[min(p + b, n) - 1]))
            q = min(p + b, n)
            sel = order[p:q]
            yield sel // n_i + t0, sel % n_i, int(lens[q - 1])
            p = q


@torch.no_grad()
def itr_score_matrix(model: nn.Module, texts: Sequence[torch.Tensor],
                     images: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                     max_tokens: int = 16384, amp_dtype: Optional[torch.dtype] = None,
                     out_dtype: torch.dtype = torch.float32,
                     progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Scores [len(texts), len(images)] of every pair, on the model's device.

    ``texts``: 1-D token-id tensors ([CLS] caption [SEP], as the datasets build them);
    ``images``: a sequence of (features [n, img_dim], boxes [n, 7]) (read lazily, in chunks);
    ``max_tokens``: tokens (pairs x padded joint length) per encoder batch; ``amp_dtype``:
    autocast dtype for the encoder (None: the model's own dtype); ``progress``: called with
    the number of pairs of each finished batch (host counts; no sync).  The model is put in
    eval mode for the call and restored after.
    """
    weight, bias = score_head(model)
    uniter = getattr(model, "uniter", None)
    if not isinstance(uniter, nn.Module):
        raise ValueError(f"{type(model).__name__} has no UNITER encoder (.uniter)")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    lens = _check_texts(texts, uniter)
    device = weight.device
    param_dtype = uniter.embeddings.word_embeddings.weight.dtype
    n_t, n_i = len(texts), len(images)
    out = torch.zeros(n_t, n_i, dtype=out_dtype, device=device)
    if n_t == 0 or n_i == 0:
        return out
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    try:
        with amp:
            txt_tab = _embed_texts(uniter, texts, lens, device)
            img_tab, nbbs = _embed_images(uniter, images, device, param_dtype,
                                          amp_dtype is not None)
            img_tab = img_tab.to(txt_tab.dtype)
            table = torch.cat([txt_tab, img_tab, txt_tab.new_zeros(1, txt_tab.size(1))])
            tl = np.asarray(lens, dtype=np.int64)
            nb = np.asarray(nbbs, dtype=np.int64)
            txt_off = torch.from_numpy(np.concatenate([[0], np.cumsum(tl)[:-1]])).to(device)
            img_off = torch.from_numpy(np.concatenate([[0], np.cumsum(nb)[:-1]])
                                       + int(tl.sum())).to(device)
            tl_d, nb_d = torch.from_numpy(tl).to(device), torch.from_numpy(nb).to(device)
            zero_row = table.size(0) - 1
            layers = list(uniter.encoder.layer)
            flat_out = out.view(-1)
            for t_idx, i_idx, length in _batches(tl, nb, max_tokens):
                t = torch.from_numpy(t_idx)
                i = torch.from_numpy(i_idx)
                if device.type == "cuda":
                    t, i = t.pin_memory(), i.pin_memory()
                t, i = t.to(device, non_blocking=True), i.to(device, non_blocking=True)
                k = torch.arange(length, device=device)[None, :]
                a, b = tl_d[t][:, None], nb_d[i][:, None]
                idx = torch.where(k < a, txt_off[t][:, None] + k,
                                  torch.where(k < a + b, img_off[i][:, None] + k - a,
                                              torch.full_like(k, zero_row)))
                mask = k < a + b
                hidden = table[idx]
                for layer in layers[:-1]:
                    hidden = layer(hidden, mask)
                if layers:
                    hidden = _cls_layer(layers[-1], hidden, mask)
                pooled = uniter.pooler(hidden)
                s = F.linear(pooled, weight, bias).view(-1)
                flat_out.index_put_((t * n_i + i,), s.to(out_dtype))
                if progress is not None:
                    progress(len(t_idx))
    finally:
        model.train(was_training)
    return out


class DatasetImages:
    """The images ``img_ids`` of an image db as the (features, boxes) sequence
    :func:`itr_score_matrix` reads (decoded lazily, cached by the db)."""

    def __init__(self, img_db, img_ids: Sequence[str]):
        self.img_db, self.img_ids = img_db, list(img_ids)

    def __len__(self) -> int:
        return len(self.img_ids)

    def __getitem__(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        d = self.img_db.get_dump(self.img_ids[j], with_soft_labels=False)
        return torch.from_numpy(d["features"]), img_pos_feat(torch.from_numpy(d["norm_bb"]))


def itm_dataset_scores(model: nn.Module, dataset, **kw) -> torch.Tensor:
    """:func:`itr_score_matrix` of an ``ItmEvalDataset``: rows ``dataset.ids`` (this rank's
    captions), columns ``dataset.all_img_ids`` (the original's score-matrix layout)."""
    db = dataset.txt_db
    texts = [torch.tensor(db.combine_inputs(db[id_]["input_ids"])) for id_ in dataset.ids]
    return itr_score_matrix(model, texts, DatasetImages(dataset.img_db, dataset.all_img_ids),
                            **kw)


@torch.no_grad()
def itm_loop_scores(model: nn.Module, dataset, device: Optional[torch.device] = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The original's ``inference``: per caption, every mini-batch of ``dataset[i]`` (an
    ``ItmEvalDataset``) through ``model(batch, compute_loss=False)``.  Slow; the reference
    for :func:`itr_score_matrix`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(dataset), len(dataset.all_img_ids), dtype=out_dtype, device=device)
    try:
        for i in range(len(dataset)):
            j = 0
            for batch in dataset[i]:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                s = model(batch, compute_loss=False).view(-1)
                out[i, j:j + s.numel()] = s.to(out_dtype)
                j += s.numel()
    finally:
        model.train(was_training)
    return out
