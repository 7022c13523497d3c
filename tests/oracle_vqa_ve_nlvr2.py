"""An independent functional transcription of UNITER's fine-tuning models (VQA, VE, NLVR2
paired / triplet / paired-attn), their state-dict layout and their training loss reductions.

Written from the original's ``model/vqa.py``, ``model/ve.py``, ``model/nlvr2.py``,
``model/attention.py`` (torch's pre-1.2 multi-head attention: packed in-projection,
``-inf`` key padding, q scaled before the product), ``train_vqa.py`` / ``train_ve.py`` /
``train_nlvr2.py`` over a plain state dict, with torch's own functional ops only: no
uniter_fast code, so agreement checks the package's wiring.
"""
import math

import torch
import torch.nn.functional as F

U = "uniter."
LN_EPS = 1e-12


# ----------------------------------------------------------------------------- layout
def encoder_layout(cfg, img_dim, n_types=None):
    """(key, shape) of UNITER's encoder in the original's registration order."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    n_types = n_types or cfg.type_vocab_size
    e = U + "embeddings."
    out = [(e + "word_embeddings.weight", (cfg.vocab_size, h)),
           (e + "position_embeddings.weight", (cfg.max_position_embeddings, h)),
           (e + "token_type_embeddings.weight", (n_types, h)),
           (e + "LayerNorm.weight", (h,)), (e + "LayerNorm.bias", (h,))]
    m = U + "img_embeddings."
    out += [(m + "img_linear.weight", (h, img_dim)), (m + "img_linear.bias", (h,)),
            (m + "img_layer_norm.weight", (h,)), (m + "img_layer_norm.bias", (h,)),
            (m + "pos_layer_norm.weight", (h,)), (m + "pos_layer_norm.bias", (h,)),
            (m + "pos_linear.weight", (h, 7)), (m + "pos_linear.bias", (h,)),
            (m + "mask_embedding.weight", (2, img_dim)),
            (m + "LayerNorm.weight", (h,)), (m + "LayerNorm.bias", (h,))]
    for n in range(cfg.num_hidden_layers):
        p = f"{U}encoder.layer.{n}."
        for name in ("query", "key", "value"):
            out += [(p + f"attention.self.{name}.weight", (h, h)),
                    (p + f"attention.self.{name}.bias", (h,))]
        out += [(p + "attention.output.dense.weight", (h, h)),
                (p + "attention.output.dense.bias", (h,)),
                (p + "attention.output.LayerNorm.weight", (h,)),
                (p + "attention.output.LayerNorm.bias", (h,)),
                (p + "intermediate.dense.weight", (i, h)), (p + "intermediate.dense.bias", (i,)),
                (p + "output.dense.weight", (h, i)), (p + "output.dense.bias", (h,)),
                (p + "output.LayerNorm.weight", (h,)), (p + "output.LayerNorm.bias", (h,))]
    out += [(U + "pooler.dense.weight", (h, h)), (U + "pooler.dense.bias", (h,))]
    return out


def _mha_layout(p, h):
    return [(p + "in_proj_weight", (3 * h, h)), (p + "in_proj_bias", (3 * h,)),
            (p + "out_proj.weight", (h, h)), (p + "out_proj.bias", (h,))]


def head_layout(model, cfg, num_answer=None):
    h = cfg.hidden_size
    if model in ("vqa", "ve"):
        na = 3 if model == "ve" else num_answer
        return [("vqa_output.0.weight", (2 * h, h)), ("vqa_output.0.bias", (2 * h,)),
                ("vqa_output.2.weight", (2 * h,)), ("vqa_output.2.bias", (2 * h,)),
                ("vqa_output.3.weight", (na, 2 * h)), ("vqa_output.3.bias", (na,))]
    if model == "paired":
        return [("nlvr2_output.weight", (2, 2 * h)), ("nlvr2_output.bias", (2,))]
    if model == "triplet":
        return [("nlvr2_output.weight", (2, h)), ("nlvr2_output.bias", (2,))]
    if model == "paired-attn":
        return (_mha_layout("attn1.", h) + _mha_layout("attn2.", h)
                + [("fc.0.weight", (h, 2 * h)), ("fc.0.bias", (h,)),
                   ("attn_pool.fc.0.weight", (1, h)), ("attn_pool.fc.0.bias", (1,)),
                   ("nlvr2_output.weight", (2, 2 * h)), ("nlvr2_output.bias", (2,))])
    raise ValueError(model)


def layout(model, cfg, img_dim, num_answer=None, type_embedding_initialised=True):
    """The full ordered state-dict layout of a task model (NLVR2 models after
    ``init_type_embedding()`` when ``type_embedding_initialised``)."""
    n_types = 3 if model in ("paired", "triplet", "paired-attn") and type_embedding_initialised \
        else None
    return encoder_layout(cfg, img_dim, n_types) + head_layout(model, cfg, num_answer)


# ----------------------------------------------------------------------------- forward
def _ln(sd, p, x):
    return F.layer_norm(x, (x.size(-1),), sd[p + ".weight"], sd[p + ".bias"], LN_EPS)


def _lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def encode(sd, cfg, batch, img_type_ids=None):
    """UNITER's encoder: [text; regions] embeddings, gather_index compaction, post-LN layers."""
    ids = batch["input_ids"]
    tt = sd[U + "embeddings.token_type_embeddings.weight"]
    txt = (sd[U + "embeddings.word_embeddings.weight"][ids]
           + sd[U + "embeddings.position_embeddings.weight"][batch["position_ids"]]
           + tt[torch.zeros_like(ids)])
    txt = _ln(sd, U + "embeddings.LayerNorm", txt)
    m = U + "img_embeddings."
    feat = batch["img_feat"]
    if img_type_ids is None:
        img_type_ids = torch.ones(feat.shape[:2], dtype=torch.long)
    img = (_ln(sd, m + "img_layer_norm", _lin(sd, m + "img_linear", feat))
           + _ln(sd, m + "pos_layer_norm", _lin(sd, m + "pos_linear", batch["img_pos_feat"]))
           + tt[img_type_ids])
    img = _ln(sd, m + "LayerNorm", img)
    joint = torch.cat([txt, img], dim=1)
    x = joint.gather(1, batch["gather_index"][..., None].expand(-1, -1, joint.size(-1)))
    ext = (1.0 - batch["attn_masks"].float())[:, None, None, :] * -10000.0
    nh, b, s = cfg.num_attention_heads, x.size(0), x.size(1)
    d = cfg.hidden_size // nh
    for n in range(cfg.num_hidden_layers):
        p = f"{U}encoder.layer.{n}."
        q, k, v = (_lin(sd, p + "attention.self." + w, x).view(b, s, nh, d).transpose(1, 2)
                   for w in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + ext, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, nh * d)
        a = _ln(sd, p + "attention.output.LayerNorm",
                _lin(sd, p + "attention.output.dense", ctx) + x)
        x = _ln(sd, p + "output.LayerNorm",
                _lin(sd, p + "output.dense", F.gelu(_lin(sd, p + "intermediate.dense", a))) + a)
    return x


def pooled(sd, seq):
    return torch.tanh(_lin(sd, U + "pooler.dense", seq[:, 0]))


def vqa_forward(sd, cfg, batch, compute_loss=True):
    """VQA and VE (VE = VQA with 3 answers)."""
    x = pooled(sd, encode(sd, cfg, batch))
    x = _ln(sd, "vqa_output.2", F.gelu(_lin(sd, "vqa_output.0", x)))
    scores = _lin(sd, "vqa_output.3", x)
    if compute_loss:
        return F.binary_cross_entropy_with_logits(scores, batch["targets"], reduction="none")
    return scores


def mha(sd, p, query, key, value, key_padding_mask, num_heads):
    """torch's (pre-1.2) multi_head_attention_forward, eval mode, packed in-projection."""
    tgt, bsz, e = query.shape
    hd = e // num_heads
    w, bias = sd[p + "in_proj_weight"], sd[p + "in_proj_bias"]
    q = F.linear(query, w[:e], bias[:e]) * hd ** -0.5
    k = F.linear(key, w[e:2 * e], bias[e:2 * e])
    v = F.linear(value, w[2 * e:], bias[2 * e:])
    q = q.contiguous().view(tgt, bsz * num_heads, hd).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, hd).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, hd).transpose(0, 1)
    src = k.size(1)
    att = torch.bmm(q, k.transpose(1, 2)).view(bsz, num_heads, tgt, src)
    att = att.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    att = torch.softmax(att.view(bsz * num_heads, tgt, src), dim=-1)
    out = torch.bmm(att, v).transpose(0, 1).contiguous().view(tgt, bsz, e)
    return F.linear(out, sd[p + "out_proj.weight"], sd[p + "out_proj.bias"])


def attn_pool(sd, x, mask):
    score = F.relu(_lin(sd, "attn_pool.fc.0", x)).squeeze(-1) + mask.float() * -1e4
    return torch.softmax(score, dim=1).unsqueeze(1).matmul(x).squeeze(1)


def nlvr2_forward(sd, cfg, batch, model, compute_loss=True):
    seq = encode(sd, cfg, batch, batch.get("img_type_ids"))
    if model == "triplet":
        scores = _lin(sd, "nlvr2_output", pooled(sd, seq))
    elif model == "paired":
        p = pooled(sd, seq)
        scores = _lin(sd, "nlvr2_output", p.reshape(p.size(0) // 2, -1))
    elif model == "paired-attn":
        bs, tl, d = seq.shape
        left, right = seq[0::2], seq[1::2]                  # rows 2i / 2i+1
        pad = batch["attn_masks"] == 0
        lpad, rpad = pad[0::2], pad[1::2]
        lt, rt = left.transpose(0, 1), right.transpose(0, 1)
        l2r = mha(sd, "attn1.", lt, rt, rt, rpad, cfg.num_attention_heads)
        r2l = mha(sd, "attn2.", rt, lt, lt, lpad, cfg.num_attention_heads)
        lo = F.relu(_lin(sd, "fc.0", torch.cat([l2r, lt], -1))).transpose(0, 1)
        ro = F.relu(_lin(sd, "fc.0", torch.cat([r2l, rt], -1))).transpose(0, 1)
        scores = _lin(sd, "nlvr2_output",
                      torch.cat([attn_pool(sd, lo, lpad), attn_pool(sd, ro, rpad)], -1))
    else:
        raise ValueError(model)
    if compute_loss:
        return F.cross_entropy(scores, batch["targets"], reduction="none")
    return scores


# ----------------------------------------------------------------------------- training reductions
def train_loss(model, loss, batch):
    """How the original training scripts reduce the per-element loss before backward."""
    if model in ("vqa", "ve"):
        return loss.mean() * batch["targets"].size(1)      # "instance-level bce"
    return loss.mean()


def init_type_embedding(sd):
    """The original's init_type_embedding on a state dict: rows [0, 1, 1]."""
    sd = dict(sd)
    w = sd[U + "embeddings.token_type_embeddings.weight"]
    sd[U + "embeddings.token_type_embeddings.weight"] = torch.stack([w[0], w[1], w[1]])
    return sd
