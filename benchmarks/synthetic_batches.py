"""Synthetic UNITER pretraining batches for the whole-model benchmark.

Built like UNITER's collate functions (data/mlm.py, data/mrm.py, data/itm.py,
data/data.py) so the model sees what a real loader gives it: text padded with
0 and position_ids [1, max_txt_len]; region features padded with 0; a joint
attention mask [1..1 0..0]; ``gather_index`` that compacts
[text | padding | regions] into [text | regions | padding]; per task the
targets (MLM labels with -1 elsewhere, masked-region features and soft
labels, ITM targets with WRA's ``ot_inputs``).  Every tensor is random
(never all zero); lengths are random within the given ranges and the
longest example reaches each range's top.
"""
from typing import Dict, Sequence

import benchutil as bu
import torch

TASKS = ("mlm", "mrfr", "mrc-kl", "itm")


def _gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int], max_tl: int,
                  out_size: int) -> torch.Tensor:
    """Row i: positions 0..tl-1 keep text, tl..tl+nbb-1 point at the regions
    (which start at max_tl in the concatenated [text | regions] tensor)."""
    idx = torch.arange(out_size).repeat(len(txt_lens), 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        idx[i, tl:tl + nbb] = torch.arange(max_tl, max_tl + nbb)
    return idx


def _ot_scatter(txt_lens: Sequence[int], max_tl: int, joint_len: int) -> torch.Tensor:
    """Where each joint position goes in the [text(max_tl) | regions] layout."""
    sc = torch.arange(joint_len).repeat(len(txt_lens), 1)
    for i, tl in enumerate(txt_lens):
        sc[i, tl:] = torch.arange(max_tl, max_tl + joint_len - tl)
    return sc


def _region_masks(num_bbs: Sequence[int], max_nbb: int, prob: float,
                  g: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(len(num_bbs), max_nbb, dtype=torch.bool)
    for i, n in enumerate(num_bbs):
        m = torch.rand(n, generator=g) < prob
        if not m.any():
            m[int(torch.randint(0, n, (1,), generator=g))] = True
        masks[i, :n] = m
    return masks


def make_batch(task: str, batch_size: int, txt_range: Sequence[int], nbb_range: Sequence[int],
               *, vocab_size: int, img_dim: int, img_label_dim: int, seed: int = 0,
               device: torch.device = torch.device("cpu"), mask_prob: float = 0.15
               ) -> Dict[str, object]:
    """One UNITER batch dict for ``task`` in {mlm, mrfr, mrc, mrc-kl, itm}."""
    if task not in TASKS + ("mrc",):
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS + ('mrc',)}")
    g = torch.Generator().manual_seed(seed)
    txt_lens = bu.lengths(batch_size, txt_range[0], txt_range[1], g)
    num_bbs = bu.lengths(batch_size, nbb_range[0], nbb_range[1], g)
    b, max_tl, max_nbb = batch_size, max(txt_lens), max(num_bbs)
    joint = max(t + n for t, n in zip(txt_lens, num_bbs))

    input_ids = torch.zeros(b, max_tl, dtype=torch.long)
    img_feat = torch.zeros(b, max_nbb, img_dim)
    img_pos_feat = torch.zeros(b, max_nbb, 7)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        input_ids[i, :tl] = torch.randint(1, vocab_size, (tl,), generator=g)
        img_feat[i, :nbb] = torch.rand(nbb, img_dim, generator=g) * 4  # ReLU-like features
        box = torch.rand(nbb, 6, generator=g)
        img_pos_feat[i, :nbb] = torch.cat([box, box[:, 4:5] * box[:, 5:6]], dim=1)
    attn_masks = bu.pad_mask([t + n for t, n in zip(txt_lens, num_bbs)], joint,
                             padded=False).long()
    batch: Dict[str, object] = {
        "input_ids": input_ids,
        "position_ids": torch.arange(max_tl).unsqueeze(0),
        "img_feat": img_feat,
        "img_pos_feat": img_pos_feat,
        "attn_masks": attn_masks,
        "gather_index": _gather_index(txt_lens, num_bbs, max_tl, joint),
    }
    if task == "mlm":
        labels = torch.full((b, max_tl), -1, dtype=torch.long)
        for i, tl in enumerate(txt_lens):
            pick = torch.rand(tl, generator=g) < mask_prob
            if not pick.any():
                pick[0] = True
            labels[i, :tl][pick] = input_ids[i, :tl][pick]
            input_ids[i, :tl][pick] = min(103, vocab_size - 1)  # [MASK] of BERT's vocabulary
        batch["txt_labels"] = labels
    elif task in ("mrfr", "mrc", "mrc-kl"):
        masks = _region_masks(num_bbs, max_nbb, mask_prob, g)
        tgt = torch.zeros(b, joint, dtype=torch.bool)
        for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
            tgt[i, tl:tl + nbb] = masks[i, :nbb]
        batch["img_masks"] = masks
        batch["img_mask_tgt"] = tgt
        if task == "mrfr":
            batch["feat_targets"] = img_feat[masks].clone()
        else:
            logits = torch.randn(int(masks.sum()), img_label_dim, generator=g) * 3
            batch["label_targets"] = torch.softmax(logits, dim=-1)
        batch["img_feat"] = img_feat.masked_fill(masks.unsqueeze(-1), 0)
    else:  # itm with WRA
        targets = torch.randint(0, 2, (b,), generator=g)
        if b >= 2:  # both positives and negatives, so both OT terms are exercised
            targets[0], targets[1] = 1, 0
        ot_scatter = _ot_scatter(txt_lens, max_tl, joint)
        batch["targets"] = targets
        batch["ot_inputs"] = {
            "ot_scatter": ot_scatter,
            "scatter_max": int(ot_scatter.max()),
            "txt_pad": bu.pad_mask(txt_lens, max_tl, padded=True),
            "img_pad": bu.pad_mask(num_bbs, max_nbb, padded=True),
        }

    def move(v):
        if torch.is_tensor(v):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return move(batch)


def real_tokens(batch: Dict[str, object]) -> int:
    return int(batch["attn_masks"].sum())
