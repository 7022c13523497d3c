"""Image-text retrieval evaluation: full-ranking score matrix, its gather across ranks and
retrieval recalls (UNITER's ``utils/itm_eval.py`` keys, the standard per-query recall).

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
* :func:`itm_eval`: text and image R@1/5/10, their means and the overall mean (UNITER's
  keys), each the fraction of queries with a ground truth in the top k, from the full
  score matrix: independent of the row/column order and the number of ranks (the
  original's image recall also counted row indices; see its notes).
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
#: score-matrix entries compared per chunk of rows (bounds the temporary boolean matrix)
_EVAL_CHUNK = 1 << 24


@torch.no_grad()
def itm_eval(score_matrix: torch.Tensor, txt_ids: Sequence[str], img_ids: Sequence[str],
             txt2img: Mapping[str, str], img2txts: Mapping[str, Sequence[str]]
             ) -> Dict[str, float]:
    """Retrieval recalls from ``score_matrix`` [len(txt_ids), len(img_ids)] (row: caption,
    column: image), the standard per-query recall@k:

    * text retrieval ``txt_r{1,5,10}``: the fraction of *images* (queries) for which one of
      their captions (``img2txts``) is among the top k captions of their column;
    * image retrieval ``img_r{1,5,10}``: the fraction of *captions* (queries) whose image
      (``txt2img``) is among the top k images of their row;
    * ``txt_r_mean``, ``img_r_mean`` (mean of the three recalls) and ``r_mean`` (mean of
      the two means), UNITER's names and keys.

    A query is a hit at k when fewer than k candidates score *strictly higher* than its best
    ground truth (the best-scoring of an image's captions; a caption's one image): ties
    count in the query's favour, so the figures do not depend on the order of the rows or
    columns (nor on how many ranks the rows were gathered from) and every recall is in
    [0, 1].  A k at or above the number of candidates makes every query a hit.  A NaN score
    ranks below every number: a NaN candidate never outranks, and a query whose ground
    truths all score NaN is a miss.  An image without any caption in ``txt_ids`` is a
    query that misses.

    Text retrieval is the original's definition (``utils/itm_eval.py``: per image, the best
    rank of its captions in the column's top 10), up to ties (the original broke them as
    ``topk`` did).  Image retrieval differs: the original summed ``(rank < k)`` over the
    ``nonzero()`` (row, position) pairs of the hits, which also counted the row index, i.e.
    each of the first k captions whose image is in its top 10, adding up to k / len(txt_ids)
    and depending on the caption order (one image, two captions: R@5 = 2.0).

    Raises ``ValueError`` for a matrix of the wrong shape, no captions or no images,
    duplicated ids, a caption whose image is not among ``img_ids`` (or that has no
    ``txt2img`` entry), an image without an ``img2txts`` entry, or an ``img2txts`` caption
    not among ``txt_ids``.
    """
    n_t, n_i = len(txt_ids), len(img_ids)
    if score_matrix.dim() != 2 or tuple(score_matrix.shape) != (n_t, n_i):
        raise ValueError(f"score_matrix must be [len(txt_ids)={n_t}, len(img_ids)={n_i}], got "
                         f"{tuple(score_matrix.shape)}")
    if n_t == 0 or n_i == 0:
        raise ValueError(f"itm_eval needs at least one caption and one image, got {n_t} "
                         f"captions and {n_i} images")
    txt2i = {t: i for i, t in enumerate(txt_ids)}
    img2j = {img: j for j, img in enumerate(img_ids)}
    if len(txt2i) != n_t or len(img2j) != n_i:
        raise ValueError("itm_eval: txt_ids and img_ids must not repeat an id")
    if not score_matrix.is_floating_point():
        score_matrix = score_matrix.double()
    dev = score_matrix.device
    try:
        gt_j = [img2j[txt2img[t]] for t in txt_ids]
    except KeyError as e:
        raise ValueError(f"itm_eval: caption or image {e} has no column (txt2img names an "
                         "image that is not in img_ids, or a caption lacks txt2img)") from None
    rows, cols = [], []
    for j, img in enumerate(img_ids):
        if img not in img2txts:
            raise ValueError(f"itm_eval: image {img!r} has no img2txts entry")
        for t in img2txts[img]:
            if t not in txt2i:
                raise ValueError(f"itm_eval: caption {t!r} of image {img!r} (img2txts) is not "
                                 "in txt_ids")
            rows.append(txt2i[t])
            cols.append(j)
    # the ground truth's score of each caption (image retrieval) and the best of each
    # image's captions (text retrieval); the values are the matrix's own, so the strict
    # comparisons below are exact in its dtype
    gt_img = score_matrix[torch.arange(n_t, device=dev), torch.tensor(gt_j, device=dev)]
    img_valid = ~torch.isnan(gt_img)
    best_txt = torch.full((n_i,), float("-inf"), dtype=torch.float64, device=dev)
    txt_valid = torch.zeros(n_i, dtype=torch.bool, device=dev)
    if rows:
        r = torch.tensor(rows, device=dev)
        c = torch.tensor(cols, device=dev)
        v = score_matrix[r, c].double()
        ok = ~torch.isnan(v)
        best_txt.scatter_reduce_(0, c[ok], v[ok], "amax")
        txt_valid[c[ok]] = True
    best_txt = best_txt.to(score_matrix.dtype)          # exact: matrix values or -inf
    # candidates scoring strictly higher (NaN never compares higher)
    higher_img = torch.empty(n_t, dtype=torch.long, device=dev)   # per caption
    higher_txt = torch.zeros(n_i, dtype=torch.long, device=dev)   # per image
    step = max(1, _EVAL_CHUNK // n_i)
    for r0 in range(0, n_t, step):
        chunk = score_matrix[r0:r0 + step]
        higher_img[r0:r0 + step] = (chunk > gt_img[r0:r0 + step, None]).sum(1)
        higher_txt += (chunk > best_txt[None, :]).sum(0)
    tr = [float((txt_valid & (higher_txt < k)).sum()) / n_i for k in RECALL_KS]
    ir = [float((img_valid & (higher_img < k)).sum()) / n_t for k in RECALL_KS]
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
