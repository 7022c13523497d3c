"""Random UNITER batches built independently of uniter_fast.data (for model tests)."""
import torch


def make_batch(task, vocab, img_dim, label_dim, txt_lens, num_bbs, *, mask_dtype=torch.uint8,
               gen=None, device="cpu"):
    """A UNITER batch dict for ``task`` with the given per-example lengths.

    Follows UNITER's collate functions: text padded with 0, joint attention
    mask, gather_index compacting [text | regions], ot_inputs for itm.
    """
    g = gen or torch.Generator().manual_seed(0)
    b = len(txt_lens)
    max_tl, max_nbb = max(txt_lens), max(num_bbs)
    joint = [t + n for t, n in zip(txt_lens, num_bbs)]
    out = max(joint)
    input_ids = torch.zeros(b, max_tl, dtype=torch.long)
    img_feat = torch.zeros(b, max_nbb, img_dim)
    img_pos = torch.zeros(b, max_nbb, 7)
    attn = torch.zeros(b, out, dtype=mask_dtype)
    gather = torch.arange(out).repeat(b, 1)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        input_ids[i, :t] = torch.randint(1, vocab, (t,), generator=g)
        img_feat[i, :n] = torch.randn(n, img_dim, generator=g)
        img_pos[i, :n] = torch.rand(n, 7, generator=g)
        attn[i, :t + n] = 1
        gather[i, t:t + n] = torch.arange(max_tl, max_tl + n)
    batch = dict(input_ids=input_ids, position_ids=torch.arange(max_tl).unsqueeze(0),
                 img_feat=img_feat, img_pos_feat=img_pos, attn_masks=attn, gather_index=gather)
    if task == "mlm":
        labels = torch.full((b, max_tl), -1, dtype=torch.long)
        for i, t in enumerate(txt_lens):
            pos = torch.randperm(t, generator=g)[:max(1, t // 4)]
            labels[i, pos] = input_ids[i, pos]
        batch["txt_labels"] = labels
    elif task in ("mrfr", "mrc", "mrc-kl"):
        img_masks = torch.zeros(b, max_nbb, dtype=mask_dtype)
        for i, n in enumerate(num_bbs):
            img_masks[i, torch.randperm(n, generator=g)[:max(1, n // 3)]] = 1
        # UNITER's img_mask_tgt: [zeros(txt_len), img_mask] padded to the joint length
        tgt = torch.zeros(b, out, dtype=mask_dtype)
        for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
            tgt[i, t:t + n] = img_masks[i, :n]
        bm = img_masks.bool()
        batch["feat_targets"] = img_feat[bm].clone()
        batch["img_feat"] = img_feat.masked_fill(bm.unsqueeze(-1), 0)
        batch["img_masks"] = img_masks
        batch["img_mask_tgt"] = tgt
        soft = torch.rand(int(bm.sum()), label_dim, generator=g)
        batch["label_targets"] = soft / soft.sum(-1, keepdim=True)
    elif task == "itm":
        batch["targets"] = torch.randint(0, 2, (b,), generator=g)
        ot_scatter = torch.arange(out).repeat(b, 1)
        for i, t in enumerate(txt_lens):
            ot_scatter[i, t:] = torch.arange(max_tl, max_tl + out - t)
        txt_pad = torch.zeros(b, max_tl, dtype=mask_dtype)
        img_pad = torch.zeros(b, max_nbb, dtype=mask_dtype)
        for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
            txt_pad[i, t:] = 1
            img_pad[i, n:] = 1
        batch["ot_inputs"] = dict(ot_scatter=ot_scatter, scatter_max=int(ot_scatter.max()),
                                  txt_pad=txt_pad, img_pad=img_pad)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
