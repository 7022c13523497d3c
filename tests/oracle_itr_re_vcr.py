"""An independent functional transcription of UNITER's retrieval, referring-expression and
VCR models (``model/itm.py``, ``model/re.py``, ``model/vcr.py``, ``model/pretrain_vcr.py``),
their state-dict layouts, their metrics (``utils/itm_eval.py``, ``computeIoU``,
``compute_accuracies``) and the training scripts' loss reductions, over a plain state dict
with torch's own functional ops and plain Python loops: no uniter_fast code.
"""
import math

import torch
import torch.nn.functional as F
from oracle_vqa_ve_nlvr2 import encoder_layout

U = "uniter."
LN_EPS = 1e-12


# ----------------------------------------------------------------------------- layouts
def head_layout(model, cfg, img_dim=None, label_dim=None, mlp=1):
    h = cfg.hidden_size
    if model in ("itm", "itm-hn"):
        return [("itm_output.weight", (2, h)), ("itm_output.bias", (2,)),
                ("rank_output.weight", (1, h)), ("rank_output.bias", (1,))]
    if model == "re":
        if mlp == 1:
            return [("re_output.weight", (1, h)), ("re_output.bias", (1,))]
        return [("re_output.0.weight", (h, h)), ("re_output.0.bias", (h,)),
                ("re_output.2.weight", (h,)), ("re_output.2.bias", (h,)),
                ("re_output.3.weight", (1, h)), ("re_output.3.bias", (1,))]
    if model == "vcr":
        return [("vcr_output.0.weight", (2 * h, h)), ("vcr_output.0.bias", (2 * h,)),
                ("vcr_output.2.weight", (2 * h,)), ("vcr_output.2.bias", (2 * h,)),
                ("vcr_output.3.weight", (2, 2 * h)), ("vcr_output.3.bias", (2,))]
    if model == "pretrain-vcr":
        v = cfg.vocab_size + 81
        return [("cls.predictions.bias", (v,)),
                ("cls.predictions.transform.dense.weight", (h, h)),
                ("cls.predictions.transform.dense.bias", (h,)),
                ("cls.predictions.transform.LayerNorm.weight", (h,)),
                ("cls.predictions.transform.LayerNorm.bias", (h,)),
                ("cls.predictions.decoder.weight", (v, h)),
                ("feat_regress.weight", (h, img_dim)), ("feat_regress.bias", (img_dim,)),
                ("feat_regress.net.0.weight", (h, h)), ("feat_regress.net.0.bias", (h,)),
                ("feat_regress.net.2.weight", (h,)), ("feat_regress.net.2.bias", (h,)),
                ("region_classifier.net.0.weight", (h, h)),
                ("region_classifier.net.0.bias", (h,)),
                ("region_classifier.net.2.weight", (h,)), ("region_classifier.net.2.bias", (h,)),
                ("region_classifier.net.3.weight", (label_dim, h)),
                ("region_classifier.net.3.bias", (label_dim,)),
                ("itm_output.weight", (2, h)), ("itm_output.bias", (2,))]
    raise ValueError(model)


def layout(model, cfg, img_dim, label_dim=None, mlp=1, initialised=True):
    """Ordered (key, shape) of a task model; VCR models after ``init_type_embedding()`` and
    ``init_word_embedding(81)`` when ``initialised``."""
    enc = encoder_layout(cfg, img_dim, 4 if model.endswith("vcr") and initialised else None)
    if model.endswith("vcr") and initialised:
        w = U + "embeddings.word_embeddings.weight"
        enc = [(k, (cfg.vocab_size + 81, s[1]) if k == w else s) for k, s in enc]
    return enc + head_layout(model, cfg, img_dim, label_dim, mlp)


# ----------------------------------------------------------------------------- encoder
def _ln(sd, p, x):
    return F.layer_norm(x, (x.size(-1),), sd[p + ".weight"], sd[p + ".bias"], LN_EPS)


def _lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def encode(sd, cfg, batch, txt_type_ids=None, img_masks=None):
    """UNITER's encoder with optional text token types and region masking."""
    ids = batch["input_ids"]
    tt = sd[U + "embeddings.token_type_embeddings.weight"]
    if txt_type_ids is None:
        txt_type_ids = torch.zeros_like(ids)
    txt = (sd[U + "embeddings.word_embeddings.weight"][ids]
           + sd[U + "embeddings.position_embeddings.weight"][batch["position_ids"]]
           + tt[txt_type_ids])
    txt = _ln(sd, U + "embeddings.LayerNorm", txt)
    m = U + "img_embeddings."
    feat = batch["img_feat"]
    if img_masks is not None:
        feat = feat + img_masks.float().unsqueeze(-1) * sd[m + "mask_embedding.weight"][1]
    img = (_ln(sd, m + "img_layer_norm", _lin(sd, m + "img_linear", feat))
           + _ln(sd, m + "pos_layer_norm", _lin(sd, m + "pos_linear", batch["img_pos_feat"]))
           + tt[1])
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


# ----------------------------------------------------------------------------- ITR
def itm_rank_forward(sd, cfg, batch, margin=0.2, compute_loss=True):
    s = _lin(sd, "rank_output", pooled(sd, encode(sd, cfg, batch)))
    if not compute_loss:
        return s
    s = torch.sigmoid(s).view(-1, batch["sample_size"])
    return torch.clamp(margin + s[:, 1:] - s[:, :1], 0)


def init_output(sd):
    sd = dict(sd)
    sd["rank_output.weight"] = sd["itm_output.weight"][1:].clone()
    sd["rank_output.bias"] = sd["itm_output.bias"][1:].clone()
    return sd


def hard_neg_forward(sd, cfg, batch, sample_from, hard_size, margin=0.2):
    """Training forward of the hard-negative model, row by row: score every pair alone,
    keep the positive and the hard_size best-scoring negatives (by a full sort), then the
    triplet loss of each kept negative against the positive."""
    n = batch["attn_masks"].size(0)
    rows = []
    for r in range(n):
        ti = 0 if sample_from == "t" else r
        ii = r if sample_from == "t" else 0
        tl = int((batch["input_ids"][ti] != 0).sum())
        nbb = int(batch["attn_masks"][r].sum()) - tl
        ids = batch["input_ids"][ti:ti + 1, :tl]
        one = {"input_ids": ids, "position_ids": torch.arange(tl)[None],
               "img_feat": batch["img_feat"][ii:ii + 1, :nbb],
               "img_pos_feat": batch["img_pos_feat"][ii:ii + 1, :nbb],
               "attn_masks": torch.ones(1, tl + nbb, dtype=torch.long),
               "gather_index": torch.arange(tl + nbb)[None]}
        rows.append(one)
    scores = [float(itm_rank_forward(sd, cfg, one, compute_loss=False)) for one in rows]
    order = sorted(range(1, n), key=lambda j: -scores[j])[:hard_size]
    sig = [torch.sigmoid(itm_rank_forward(sd, cfg, rows[j], compute_loss=False)).view(())
           for j in [0] + order]
    return torch.stack([torch.clamp(margin + s - sig[0], 0) for s in sig[1:]]).view(1, -1), order


def itm_eval(score_matrix, txt_ids, img_ids, txt2img, img2txts):
    """``utils/itm_eval.py``'s ``itm_eval``, brute force: every text's rank of its image
    and every image's best rank among its texts, from a full sort.  Like the original's
    ``(rank < k).sum()`` over the ``nonzero()`` pairs (row, column), the image recalls also
    count each of the first k texts whose image is in its top 10."""
    n_t, n_i = score_matrix.shape
    top = min(10, n_i)
    ir = [0, 0, 0]
    for t, txt in enumerate(txt_ids):
        row = score_matrix[t].tolist()
        order = sorted(range(n_i), key=lambda j: -row[j])
        r = order.index(img_ids.index(txt2img[txt]))
        for q, k in enumerate((1, 5, 10)):
            if r < top:
                ir[q] += (r < k) + (t < k)
    tr = [0, 0, 0]
    top_t = min(10, n_t)
    for j, img in enumerate(img_ids):
        col = score_matrix[:, j].tolist()
        order = sorted(range(n_t), key=lambda t: -col[t])
        best = min([order.index(txt_ids.index(t)) for t in img2txts[img]]
                   + [10])
        best = best if best < top_t else 10
        for q, k in enumerate((1, 5, 10)):
            tr[q] += best < k
    ir = [x / n_t for x in ir]
    tr = [x / n_i for x in tr]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tm,
            "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": im,
            "r_mean": (tm + im) / 2}


# ----------------------------------------------------------------------------- RE
def re_scores(sd, cfg, batch, mlp=1):
    seq = encode(sd, cfg, batch)
    n, max_bb = len(batch["num_bbs"]), max(batch["num_bbs"])
    hid = torch.zeros(n, max_bb, seq.size(-1))
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"])):
        hid[i, :nbb] = seq[i, tl:tl + nbb]
    if mlp == 1:
        s = _lin(sd, "re_output", hid)
    else:
        s = _lin(sd, "re_output.3", _ln(sd, "re_output.2", F.gelu(_lin(sd, "re_output.0", hid))))
    return s.squeeze(2).masked_fill(batch["obj_masks"].bool(), -1e4)


def re_loss(sd, cfg, batch, loss="cls", margin=0.2, neg_ix=None, mlp=1):
    s = re_scores(sd, cfg, batch, mlp)
    t = batch["targets"].view(-1)
    if loss == "cls":
        return F.cross_entropy(s, t, reduction="none")
    pos = torch.sigmoid(s.gather(1, t[:, None])).view(-1)
    neg = torch.sigmoid(s.gather(1, neg_ix[:, None])).view(-1)
    return torch.clamp(margin + neg - pos, 0)


def compute_iou(b1, b2):
    """``ReEvalDataset.computeIoU``."""
    x1, y1 = max(b1[0], b2[0]), max(b1[1], b2[1])
    x2, y2 = min(b1[0] + b1[2] - 1, b2[0] + b2[2] - 1), min(b1[1] + b1[3] - 1, b2[1] + b2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if (x1 < x2 and y1 < y2) else 0
    return float(inter) / (b1[2] * b1[3] + b2[2] * b2[3] - inter)


# ----------------------------------------------------------------------------- VCR
def vcr_init(sd, extra_word_rows):
    """init_type_embedding (rows [0, 1, 0, 0]) and init_word_embedding (``extra_word_rows``
    appended) on a state dict."""
    sd = dict(sd)
    w = sd[U + "embeddings.token_type_embeddings.weight"]
    sd[U + "embeddings.token_type_embeddings.weight"] = torch.stack([w[0], w[1], w[0], w[0]])
    k = U + "embeddings.word_embeddings.weight"
    sd[k] = torch.cat([sd[k], extra_word_rows])
    return sd


def vcr_forward(sd, cfg, batch, compute_loss=True):
    x = pooled(sd, encode(sd, cfg, batch, batch.get("txt_type_ids")))
    x = _ln(sd, "vcr_output.2", F.relu(_lin(sd, "vcr_output.0", x)))
    s = _lin(sd, "vcr_output.3", x)
    if compute_loss:
        return F.cross_entropy(s, batch["targets"].squeeze(-1), reduction="mean")
    return s[:, 1:]


def vcr_accuracies(scores, qa_targets, qar_targets):
    """``train_vcr.py``'s validation on one batch: QA->R scores picked for the right answer
    when the rows hold all 16, then ``compute_accuracies``; plain loops."""
    n = len(qa_targets)
    scores = scores.view(n, -1)
    n_qa = n_qar = n_all = 0
    qa_loss = qar_loss = 0.0
    for i in range(n):
        row = scores[i].tolist()
        a = int(qa_targets[i])
        qar = row[4 + 4 * a:8 + 4 * a] if len(row) > 8 else row[4:8]
        pa = max(range(4), key=lambda k: row[k])
        pr = max(range(4), key=lambda k: qar[k])
        ok_a, ok_r = pa == a, pr == int(qar_targets[i])
        n_qa += ok_a
        n_qar += ok_r
        n_all += ok_a and ok_r
        qa_loss += -math.log(math.exp(row[a]) / sum(math.exp(v) for v in row[:4]))
        r = int(qar_targets[i])
        qar_loss += -math.log(math.exp(qar[r]) / sum(math.exp(v) for v in qar))
    return n_qa, n_qar, n_all, qa_loss, qar_loss


def pretrain_vcr_forward(sd, cfg, batch, task):
    tt = batch.get("txt_type_ids")
    if task == "mlm":
        h = encode(sd, cfg, batch, tt)[:, :batch["input_ids"].size(1)]
        lab = batch["txt_labels"]
        x = _ln(sd, "cls.predictions.transform.LayerNorm",
                F.gelu(_lin(sd, "cls.predictions.transform.dense", h[lab != -1])))
        scores = x @ sd[U + "embeddings.word_embeddings.weight"].t() + sd["cls.predictions.bias"]
        return F.cross_entropy(scores, lab[lab != -1], reduction="none")
    h = encode(sd, cfg, batch, tt, img_masks=batch["img_masks"])
    x = h[batch["img_mask_tgt"].bool()]
    if task == "mrfr":
        x = _ln(sd, "feat_regress.net.2", F.gelu(_lin(sd, "feat_regress.net.0", x)))
        pred = x @ sd[U + "img_embeddings.img_linear.weight"] + sd["feat_regress.bias"]
        return F.mse_loss(pred, batch["feat_targets"], reduction="none")
    x = _ln(sd, "region_classifier.net.2", F.gelu(_lin(sd, "region_classifier.net.0", x)))
    pred = _lin(sd, "region_classifier.net.3", x)
    if task == "mrc-kl":
        return F.kl_div(F.log_softmax(pred, -1), batch["label_targets"], reduction="none")
    hard = batch["label_targets"][:, 1:].argmax(-1) + 1
    return F.cross_entropy(pred, hard, ignore_index=0, reduction="none")


# ----------------------------------------------------------------------------- reductions
def train_loss(model, loss, train_batch_size=None):
    """How the original training scripts reduce the model's loss before backward."""
    if model == "itm":
        return loss.mean()
    if model == "itm-hn":
        return loss.mean() / train_batch_size
    if model == "re":
        return loss.sum()
    if model == "vcr":
        return loss.mean()
    raise ValueError(model)
