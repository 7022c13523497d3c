"""An independent functional transcription of UNITER's pretraining forward.

Written straight from the original's math (BERT post-LN layers, additive
−10000 mask, gather_index compaction, tied heads, UNITER's batched IPOT) over
a plain state dict, with torch's own F.layer_norm / F.gelu / matmul softmax:
no uniter_fast code is used, so agreement checks the model's wiring.
"""
import math

import torch
import torch.nn.functional as F


def _ln(sd, p, x):
    return F.layer_norm(x, (x.size(-1),), sd[p + ".weight"], sd[p + ".bias"], 1e-12)


def _lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def encode(sd, cfg, batch, img_masks=None):
    ids, pos = batch["input_ids"], batch["position_ids"]
    u = "uniter."
    txt = (sd[u + "embeddings.word_embeddings.weight"][ids]
           + sd[u + "embeddings.position_embeddings.weight"][pos]
           + sd[u + "embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    txt = _ln(sd, u + "embeddings.LayerNorm", txt)
    feat = batch["img_feat"]
    if img_masks is not None:
        row1 = sd[u + "img_embeddings.mask_embedding.weight"][1]
        feat = feat + img_masks.float().unsqueeze(-1) * row1
    ie = u + "img_embeddings."
    im = _ln(sd, ie + "img_layer_norm", _lin(sd, ie + "img_linear", feat))
    ps = _ln(sd, ie + "pos_layer_norm", _lin(sd, ie + "pos_linear", batch["img_pos_feat"]))
    typ = sd[u + "embeddings.token_type_embeddings.weight"][1]
    img = _ln(sd, ie + "LayerNorm", im + ps + typ)
    joint = torch.cat([txt, img], 1)
    h = torch.gather(joint, 1, batch["gather_index"].unsqueeze(-1).expand(-1, -1, joint.size(-1)))
    add = (1.0 - batch["attn_masks"].float())[:, None, None, :] * -10000.0
    nh = cfg.num_attention_heads
    d = cfg.hidden_size // nh
    for i in range(cfg.num_hidden_layers):
        p = f"{u}encoder.layer.{i}."
        b, s, _ = h.shape
        q, k, v = (_lin(sd, p + f"attention.self.{n}", h).view(b, s, nh, d).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + add, -1)
        ctx = (att @ v).permute(0, 2, 1, 3).reshape(b, s, nh * d)
        a = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", ctx) + h)
        inter = F.gelu(_lin(sd, p + "intermediate.dense", a))
        h = _ln(sd, p + "output.LayerNorm", _lin(sd, p + "output.dense", inter) + a)
    return h


def ipot_np(C, x_pad, y_pad, beta, iteration, k):
    """UNITER's IPOT in float64 NumPy, one example at a time (C: [M, N])."""
    import numpy as np
    C = np.asarray(C, dtype=np.float64)
    xr = ~np.asarray(x_pad, bool)
    yr = ~np.asarray(y_pad, bool)
    m, n = C.shape
    T = np.zeros((n, m))
    if xr.sum() == 0 or yr.sum() == 0:
        return T
    Cs = C[np.ix_(xr, yr)]
    mm, nn = Cs.shape
    sigma = np.full(mm, 1.0 / mm)
    Ts = np.ones((nn, mm))
    A = np.exp(-Cs.T / beta)
    for _ in range(iteration):
        Q = A * Ts
        for _ in range(k):
            delta = 1.0 / (nn * (Q @ sigma))
            sigma = 1.0 / (mm * (delta @ Q))
        Ts = delta[:, None] * Q * sigma[None, :]
    T[np.ix_(yr, xr)] = Ts
    return T


def pretrain_forward(sd, cfg, batch, task):
    if task == "mlm":
        h = encode(sd, cfg, batch)[:, :batch["input_ids"].size(1)]
        lab = batch["txt_labels"]
        x = h[lab != -1]
        x = _ln(sd, "cls.predictions.transform.LayerNorm",
                F.gelu(_lin(sd, "cls.predictions.transform.dense", x)))
        scores = x @ sd["uniter.embeddings.word_embeddings.weight"].t() + sd["cls.predictions.bias"]
        return F.cross_entropy(scores, lab[lab != -1], reduction="none")
    if task in ("mrfr", "mrc", "mrc-kl"):
        h = encode(sd, cfg, batch, img_masks=batch["img_masks"])
        x = h[batch["img_mask_tgt"].bool()]
        if task == "mrfr":
            x = _ln(sd, "feat_regress.net.2", F.gelu(_lin(sd, "feat_regress.net.0", x)))
            pred = x @ sd["uniter.img_embeddings.img_linear.weight"] + sd["feat_regress.bias"]
            return F.mse_loss(pred, batch["feat_targets"], reduction="none")
        x = _ln(sd, "region_classifier.net.2", F.gelu(_lin(sd, "region_classifier.net.0", x)))
        pred = _lin(sd, "region_classifier.net.3", x)
        if task == "mrc-kl":
            return F.kl_div(F.log_softmax(pred, -1), batch["label_targets"], reduction="none")
        hard = batch["label_targets"][:, 1:].argmax(-1) + 1
        return F.cross_entropy(pred, hard, ignore_index=0, reduction="none")
    if task == "itm":
        h = encode(sd, cfg, batch)
        pooled = torch.tanh(_lin(sd, "uniter.pooler.dense", h[:, 0]))
        itm = F.cross_entropy(_lin(sd, "itm_output", pooled), batch["targets"], reduction="none")
        ot = batch["ot_inputs"]
        tl, il = batch["input_ids"].size(1), batch["img_feat"].size(1)
        b, _, hd = h.shape
        ctx = torch.zeros(b, max(ot["scatter_max"] + 1, tl + il), hd).scatter(
            1, ot["ot_scatter"].unsqueeze(-1).expand_as(h), h)
        t, v = F.normalize(ctx[:, :tl], dim=-1, eps=1e-5), F.normalize(ctx[:, tl:tl + il], dim=-1, eps=1e-5)
        C = 1 - t @ v.transpose(1, 2)
        dist = []
        for i in range(b):
            T = torch.from_numpy(ipot_np(C[i].detach().numpy(), ot["txt_pad"][i].numpy(),
                                         ot["img_pad"][i].numpy(), 0.5, 50, 1)).float()
            Cm = C[i].masked_fill(ot["txt_pad"][i].bool()[:, None] | ot["img_pad"][i].bool()[None, :], 0)
            dist.append((Cm * T.t()).sum())
        dist = torch.stack(dist)
        tg = batch["targets"]
        return itm, (dist[tg == 1], dist[tg == 0])
    raise ValueError(task)
