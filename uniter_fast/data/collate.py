"""Collate functions producing exactly UNITER's batch dicts.

Common keys: ``input_ids`` [B, L] (0-padded), ``position_ids`` [1, L],
``img_feat`` [B, N, d], ``img_pos_feat`` [B, N, 7] (0-padded), ``attn_masks``
[B, max(L_i + N_i)] (1 = real), ``gather_index`` [B, max(L_i + N_i)] (maps the
compact [text_i; regions_i] sequence to the padded [L | N] layout).
Task keys: mlm ``txt_labels`` (-1 padded); mrfr ``img_masks``, ``img_mask_tgt``,
``feat_targets``; mrc ``img_masks``, ``img_mask_tgt``, ``label_targets``; itm
``targets`` and, with OT, ``ot_inputs`` {``ot_scatter``, ``scatter_max``,
``txt_pad``, ``img_pad``}.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..masking import mask_img_feat, soft_label_targets

__all__ = ["pad_tensors", "get_gather_index", "compute_ot_scatter", "compute_pad",
           "mlm_collate", "mrfr_collate", "mrc_collate", "itm_collate", "itm_ot_collate",
           "collate_fn_for"]


def pad_tensors(tensors: Sequence[torch.Tensor], lens: Sequence[int] = None, pad: float = 0
                ) -> torch.Tensor:
    """B x [T_i, D] -> [B, max T_i, D] filled with ``pad``."""
    if lens is None:
        lens = [t.size(0) for t in tensors]
    out = torch.full((len(tensors), max(lens), tensors[0].size(-1)), pad,
                     dtype=tensors[0].dtype)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n]
    return out


def get_gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int], batch_size: int,
                     max_len: int, out_size: int) -> torch.Tensor:
    """Row i: [0..tl_i) then [max_len .. max_len+nbb_i), then identity for padding."""
    if not len(txt_lens) == len(num_bbs) == batch_size:
        raise ValueError("txt_lens, num_bbs and batch_size disagree")
    gi = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        gi[i, tl:tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long)
    return gi


def compute_ot_scatter(txt_lens: Sequence[int], max_txt_len: int, joint_len: int) -> torch.Tensor:
    """Index scattering the compact sequence into [max_txt_len text slots | image slots]."""
    sc = torch.arange(joint_len, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, tl in enumerate(txt_lens):
        sc[i, tl:] = torch.arange(max_txt_len, max_txt_len + joint_len - tl, dtype=torch.long)
    return sc


def compute_pad(lens: Sequence[int], max_len: int) -> torch.Tensor:
    """uint8 [B, max_len], 1 = padded (as UNITER)."""
    pad = torch.zeros(len(lens), max_len, dtype=torch.uint8)
    for i, n in enumerate(lens):
        pad[i, n:] = 1
    return pad


def _common(inputs: List[Dict[str, torch.Tensor]]):
    if not inputs:
        raise ValueError("cannot collate an empty batch")
    ids = [x["input_ids"] for x in inputs]
    txt_lens = [int(t.size(0)) for t in ids]
    feats = [x["img_feat"] for x in inputs]
    num_bbs = [int(f.size(0)) for f in feats]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=0)
    position_ids = torch.arange(input_ids.size(1), dtype=torch.long).unsqueeze(0)
    attn_masks = pad_sequence([x["attn_masks"] for x in inputs], batch_first=True,
                              padding_value=0)
    bs, max_tl = input_ids.shape
    batch = {"input_ids": input_ids, "position_ids": position_ids,
             "img_feat": pad_tensors(feats, num_bbs),
             "img_pos_feat": pad_tensors([x["img_pos_feat"] for x in inputs], num_bbs),
             "attn_masks": attn_masks,
             "gather_index": get_gather_index(txt_lens, num_bbs, bs, max_tl, attn_masks.size(1))}
    return batch, txt_lens, num_bbs


def mlm_collate(inputs):
    batch, _, _ = _common(inputs)
    batch["txt_labels"] = pad_sequence([x["txt_labels"] for x in inputs], batch_first=True,
                                       padding_value=-1)
    return batch


def _mrm(inputs):
    batch, _, _ = _common(inputs)
    img_masks = pad_sequence([x["img_mask"] for x in inputs], batch_first=True,
                             padding_value=False)
    batch["img_feat"], feat_targets = mask_img_feat(batch["img_feat"], img_masks)
    batch["img_masks"] = img_masks
    batch["img_mask_tgt"] = pad_sequence([x["img_mask_tgt"] for x in inputs], batch_first=True,
                                         padding_value=False)
    return batch, feat_targets, img_masks


def mrfr_collate(inputs):
    batch, feat_targets, _ = _mrm(inputs)
    batch["feat_targets"] = feat_targets
    return batch


def mrc_collate(inputs):
    batch, _, img_masks = _mrm(inputs)
    soft = pad_tensors([x["img_soft_label"] for x in inputs])
    batch["label_targets"] = soft_label_targets(soft, img_masks)
    return batch


def itm_collate(inputs):
    batch, _, _ = _common(inputs)
    batch["targets"] = torch.cat([x["target"] for x in inputs], dim=0)
    return batch


def itm_ot_collate(inputs):
    batch = itm_collate(inputs)
    txt_lens = [int(x["input_ids"].size(0)) for x in inputs]
    num_bbs = [int(x["img_feat"].size(0)) for x in inputs]
    ot_scatter = compute_ot_scatter(txt_lens, max(txt_lens), batch["attn_masks"].size(1))
    batch["ot_inputs"] = {"ot_scatter": ot_scatter, "scatter_max": int(ot_scatter.max()),
                          "txt_pad": compute_pad(txt_lens, max(txt_lens)),
                          "img_pad": compute_pad(num_bbs, max(num_bbs))}
    return batch


def collate_fn_for(task: str, itm_ot_lambda: float = 0.0):
    if task == "mlm":
        return mlm_collate
    if task == "mrfr":
        return mrfr_collate
    if task in ("mrc", "mrc-kl", "mrckl"):
        return mrc_collate
    if task == "itm":
        return itm_ot_collate if itm_ot_lambda > 0 else itm_collate
    raise ValueError(f"unknown task {task!r}")
