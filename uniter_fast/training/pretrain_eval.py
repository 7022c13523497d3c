"""Pretraining validation: every objective's metric beside its chance / majority baseline.

Per validation dataset ``<task>_<name>`` (keys of the ``validation`` record):

* ``itm``: ``loss``, ``acc`` and ``acc_majority`` (share of the commoner label).
* ``mlm``: ``loss``, ``acc`` (all masked tokens), ``acc_majority``; on dbs whose
  ``meta.json`` gives ``obj_token_range`` (the synthetic data): ``obj_acc`` on the
  masked object (class) words, ``obj_acc_chance`` (1 / #classes) and
  ``obj_acc_majority``.
* ``mrc`` / ``mrckl``: ``loss``, ``acc`` (UNITER's definition: argmax over all
  labels for MRC-KL, over the non-background labels for MRC), and ``obj_acc`` on the
  masked *object* regions (detector argmax not background; argmax over the K object
  classes) with ``obj_acc_chance`` (1/K) and ``obj_acc_majority``.
* ``mrfr``: ``loss`` (mean squared error per feature element), ``mean_baseline``
  (the same for predicting the mean target feature of the validation set, the best
  constant) and ``loss_vs_mean`` (their ratio; < 1 beats the baseline).
* ``wra_<name>`` (from each ``itm`` validation db, with or without the WRA loss in
  training): every caption with its own image and with a mismatched one;
  ``ot_pos`` / ``ot_neg`` (mean WRA distance, matched / mismatched), ``ot_pair_acc``
  (share of captions closer to their own image, chance 0.5) and, where the text db
  records the grounding (``obj_tokens`` / ``obj_regions``, the synthetic data),
  ``align_acc``: the share of object words whose transport-plan argmax region is their
  object's region, against ``align_acc_chance`` (mean 1 / #regions).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..constants import BUCKET_SIZE
from ..data import TaskLoader, TokenBucketSampler, itm_ot_collate, task_of
from ..data.datasets import DetectFeatTxtTokDataset
from ..data.sampler import config_seed
from ..reference.ot import cost_matrix_cosine
from .task import RunContext
from .validation import reduce_sums, val_batches

__all__ = ["WraEvalDataset", "wra_collate", "wra_loader", "validate_pretrain", "summary_rows",
           "format_summary", "TARGETS"]

# The default run's targets on the synthetic data (docs/pretraining.md, "What each objective learns"):
# (label, metric, baseline metric or None, rule, threshold); rule "min": metric >= threshold,
# "ratio_max": metric <= threshold x baseline, "report": shown beside its baseline, no target
# (the WRA plan's word-level alignment is not reliable on the tiny model: docs/pretraining.md).
TARGETS: Tuple[Tuple[str, str, Optional[str], str, float], ...] = (
    ("ITM", "itm/acc", "itm/acc_majority", "min", 0.9),
    ("MLM (object words)", "mlm/obj_acc", "mlm/obj_acc_chance", "min", 0.8),
    ("MRC-KL (object regions)", "mrckl/obj_acc", "mrckl/obj_acc_chance", "min", 0.6),
    ("MRFR", "mrfr/loss", "mrfr/mean_baseline", "ratio_max", 0.5),
    ("WRA distance", "wra/ot_pair_acc", "wra/ot_pair_acc_chance", "min", 0.8),
    ("WRA word->region", "wra/align_acc", "wra/align_acc_chance", "report", 0.0),
    ("WRA phrase->region", "wra/phrase_align_acc", "wra/align_acc_chance", "report", 0.0),
)


# ----------------------------------------------------------------------------- WRA data
class WraEvalDataset(DetectFeatTxtTokDataset):
    """Each caption of this rank's shard twice: with its image (target 1, with the
    word->region ground truth if the record has it) and with a mismatched image
    (target 0): the image of the caption half a shard away (a different image)."""
    task = "wra"

    def __init__(self, txt_db, img_db, **kw):
        super().__init__(txt_db, img_db, **kw)
        n = len(self.ids)
        self.neg_imgs: List[str] = []
        for i, gt in enumerate(self.img_fnames):
            j, img = (i + n // 2) % n, gt
            for _ in range(n):
                img = self.img_fnames[j]
                if img != gt:
                    break
                j = (j + 1) % n
            if img == gt:
                raise ValueError(f"text db {txt_db.db_dir}: WRA validation needs captions of at "
                                 "least 2 images in each rank's shard")
            self.neg_imgs.append(img)
        self.lens = [tl + img_db.nbb(f) for i, tl in enumerate(self.txt_lens)
                     for f in (self.img_fnames[i], self.neg_imgs[i])]

    def __len__(self) -> int:
        return 2 * len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, j: int) -> Dict[str, torch.Tensor]:
        i, neg = divmod(j, 2)
        ex = self.txt_db[self.ids[i]]
        input_ids = torch.tensor(self.txt_db.combine_inputs(self._text(i)))   # (checks ex)
        img = self.neg_imgs[i] if neg else self.img_fnames[i]
        feat, pos = self._img(img)
        toks = [] if neg else list(ex.get("obj_tokens") or [])
        regs = [] if neg else list(ex.get("obj_regions") or [])
        phrases = [] if neg else [list(p) for p in ex.get("obj_phrases") or []]
        if len(toks) != len(regs) or (phrases and len(phrases) != len(regs)):
            raise ValueError(f"text db {self.txt_db.db_dir}: record {self.ids[i]!r} has "
                             f"{len(toks)} obj_tokens, {len(phrases)} obj_phrases and "
                             f"{len(regs)} obj_regions")
        width = max([len(p) for p in phrases] + [1])
        phr = torch.full((len(phrases), width), -1, dtype=torch.long)
        for k, p in enumerate(phrases):
            phr[k, :len(p)] = torch.tensor(p, dtype=torch.long) + 1
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "target": torch.tensor([0 if neg else 1], dtype=torch.long),
                "pair": torch.tensor([i], dtype=torch.long),
                # +1: the [CLS] in front of the caption
                "obj_tokens": torch.tensor([t + 1 for t in toks], dtype=torch.long),
                "obj_regions": torch.tensor(regs, dtype=torch.long), "obj_phrases": phr}


def wra_collate(inputs):
    batch = itm_ot_collate(inputs)
    n = max(1, max(int(x["obj_tokens"].numel()) for x in inputs))
    tok = torch.full((len(inputs), n), -1, dtype=torch.long)
    reg = torch.full((len(inputs), n), -1, dtype=torch.long)
    w = max(int(x["obj_phrases"].size(1)) for x in inputs)
    phr = torch.full((len(inputs), n, w), -1, dtype=torch.long)
    for i, x in enumerate(inputs):
        k = x["obj_tokens"].numel()
        tok[i, :k], reg[i, :k] = x["obj_tokens"], x["obj_regions"]
        p = x["obj_phrases"]
        phr[i, :p.size(0), :p.size(1)] = p
    batch.update(pair=torch.cat([x["pair"] for x in inputs]), obj_tokens=tok, obj_regions=reg,
                 obj_phrases=phr)
    return batch


def wra_loader(itm_loader: TaskLoader, cfg: Dict[str, Any]) -> TaskLoader:
    """The WRA validation loader over the same text/image db as an itm validation loader."""
    ds = itm_loader.dataset
    parts = getattr(ds, "datasets", [ds])
    if len(parts) != 1:
        raise ValueError("WRA validation supports one text db per validation dataset, got "
                         f"{len(parts)}")
    d = parts[0]
    wds = WraEvalDataset(d.txt_db, d.img_db, rank=d.rank, world_size=d.world_size, seed=d.seed)
    sampler = TokenBucketSampler(cfg.get("bucket_size", BUCKET_SIZE),
                                 cfg.get("val_batch_size", cfg["train_batch_size"]),
                                 droplast=False, seed=config_seed(cfg))
    return TaskLoader(wds, wra_collate, sampler)


def transport_plan(model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(plan [B, N_img, M_txt], WRA distance [B]) of a batch from :func:`wra_collate`,
    from the final-layer text and image outputs exactly as the WRA loss uses them."""
    seq = model.uniter(batch["input_ids"], batch["position_ids"], batch["img_feat"],
                       batch["img_pos_feat"], batch["attn_masks"], batch["gather_index"],
                       output_all_encoded_layers=False)
    ot = batch["ot_inputs"]
    tl, il = batch["input_ids"].size(1), batch["img_feat"].size(1)
    b, _, h = seq.shape
    max_l = max(int(ot["scatter_max"]) + 1, tl + il)
    index = ot["ot_scatter"].long().unsqueeze(-1).expand_as(seq)
    ctx = seq.new_zeros(b, max_l, h).scatter(1, index, seq).float()
    txt_pad, img_pad = ot["txt_pad"].bool(), ot["img_pad"].bool()
    cost = cost_matrix_cosine(ctx[:, :tl], ctx[:, tl:tl + il])
    cost = cost.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
    plan = ops.ipot(cost, txt_pad, img_pad)
    return plan, (cost * plan.transpose(1, 2)).sum(dim=(1, 2))


def _wra_sums(model, batch, sums, pairs) -> None:
    plan, dist = transport_plan(model, batch)
    tgt = batch["targets"]
    for i, (p, t, d) in enumerate(zip(batch["pair"].tolist(), tgt.tolist(), dist.tolist())):
        pairs[p][t] = d
    sums["pos"] += float(dist[tgt == 1].sum())
    sums["n_pos"] += int((tgt == 1).sum())
    sums["neg"] += float(dist[tgt == 0].sum())
    sums["n_neg"] += int((tgt == 0).sum())
    toks, regs = batch["obj_tokens"], batch["obj_regions"]
    nbb = (~batch["ot_inputs"]["img_pad"].bool()).sum(1)
    valid = (toks >= 0) & (regs >= 0) & (regs < nbb[:, None])
    if valid.any():
        # plan [B, N_img, M_txt]: column of each object word, argmax over regions
        cols = plan.gather(2, toks.clamp(min=0)[:, None, :].expand(-1, plan.size(1), -1))
        pred = cols.argmax(dim=1)
        sums["align_correct"] += int(((pred == regs) & valid).sum())
        sums["align_n"] += int(valid.sum())
        sums["align_chance"] += float((valid.float() / nbb[:, None].float()).sum())
        phr = batch["obj_phrases"]                          # [B, P, W], -1 padded
        has = valid & (phr >= 0).any(-1)
        if has.any():
            # the strongest plan entry of each object's words (class and cell word) per
            # region: [B, N_img, P]; its argmax region is the object's alignment
            b, n_img, _ = plan.shape
            p, w = phr.shape[1:]
            idx = phr.clamp(min=0).view(b, 1, p * w).expand(-1, n_img, -1)
            cols = plan.gather(2, idx).view(b, n_img, p, w)
            cols = cols.masked_fill((phr < 0)[:, None], -1.0)
            pred = cols.amax(dim=-1).argmax(dim=1)
            sums["phrase_correct"] += int(((pred == regs) & has).sum())
            sums["phrase_n"] += int(has.sum())


# ----------------------------------------------------------------------------- validation
def _majority(counts: Dict[int, int]) -> float:
    tot = sum(counts.values())
    return max(counts.values()) / tot if tot else 0.0


def _reduce_counts(counts: Dict[int, int], world_size: int) -> Dict[int, int]:
    """Label histogram summed over ranks (every rank calls this, also with no labels)."""
    size = torch.tensor([max(counts, default=-1) + 1], dtype=torch.long)
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
    t = torch.zeros(int(size), dtype=torch.float64)
    for k, v in counts.items():
        t[k] += v
    if world_size > 1:
        dist.all_reduce(t)
    return {k: int(v) for k, v in enumerate(t.tolist()) if v}


def validate_pretrain(engine, val_loaders, ctx: RunContext,
                      meta: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """``{"<loader name>/<metric>": value}`` over every validation loader (see module doc)."""
    meta = meta or {}
    obj_range = meta.get("obj_token_range")
    logs: Dict[str, float] = {}
    for name, loader in val_loaders.items():
        if name.startswith("wra_"):
            logs.update(_validate_wra(engine, name, loader, ctx))
            continue
        task = task_of(name)
        sums: Dict[str, float] = defaultdict(float)
        labels_seen: Dict[int, int] = defaultdict(int)
        obj_seen: Dict[int, int] = defaultdict(int)
        label_space = 0
        feat_sum: Optional[torch.Tensor] = None
        for b, real in val_batches(loader, ctx):
            if not real:
                engine(b, task=task, compute_loss=False)
                continue
            if task == "mlm":
                scores = engine(b, task=task, compute_loss=False).float()
                labels = b["txt_labels"][b["txt_labels"] != -1]
                label_space = scores.size(-1)
                hit = scores.argmax(-1) == labels
                sums["loss"] += float(F.cross_entropy(scores, labels, reduction="sum"))
                sums["correct"] += float(hit.sum())
                sums["n"] += labels.numel()
                for v in labels.tolist():
                    labels_seen[v] += 1
                if obj_range:
                    obj = (labels >= obj_range[0]) & (labels < obj_range[1])
                    sums["obj_correct"] += float((hit & obj).sum())
                    sums["obj_n"] += float(obj.sum())
                    for v in labels[obj].tolist():
                        obj_seen[v] += 1
            elif task == "itm":
                scores, _ = engine(b, task=task, compute_loss=False)
                scores = scores.float()
                sums["loss"] += float(F.cross_entropy(scores, b["targets"], reduction="sum"))
                sums["correct"] += float((scores.argmax(-1) == b["targets"]).sum())
                sums["n"] += b["targets"].numel()
                for v in b["targets"].tolist():
                    labels_seen[v] += 1
            elif task == "mrfr":
                pred = engine(b, task=task, compute_loss=False).float()
                tgt = b["feat_targets"].float()
                sums["loss"] += float(F.mse_loss(pred, tgt, reduction="sum")) / pred.size(-1)
                sums["n"] += pred.size(0)
                sums["sq"] += float((tgt * tgt).sum()) / pred.size(-1)
                s = tgt.sum(0).double().cpu()
                feat_sum = s if feat_sum is None else feat_sum + s
            else:   # mrc / mrc-kl
                pred = engine(b, task=task, compute_loss=False).float()
                tgt = b["label_targets"].float()
                label_space = pred.size(-1)
                logp = F.log_softmax(pred, -1)
                if task == "mrc-kl":
                    sums["loss"] += float(F.kl_div(logp, tgt, reduction="sum"))
                    sums["correct"] += float((pred.argmax(-1) == tgt.argmax(-1)).sum())
                else:
                    hard = tgt[:, 1:].argmax(-1) + 1
                    sums["loss"] += float(F.nll_loss(logp, hard, reduction="sum"))
                    sums["correct"] += float((pred[:, 1:].argmax(-1) == hard - 1).sum())
                sums["n"] += pred.size(0)
                obj = tgt.argmax(-1) != 0
                cls = tgt[:, 1:].argmax(-1)
                sums["obj_correct"] += float(((pred[:, 1:].argmax(-1) == cls) & obj).sum())
                sums["obj_n"] += float(obj.sum())
                for v in cls[obj].tolist():
                    obj_seen[v + 1] += 1
        keys = ("loss", "correct", "n", "obj_correct", "obj_n", "sq")
        t = reduce_sums(sums, keys, ctx.world_size)
        if t["n"] <= 0:
            continue
        logs[f"{name}/loss"] = t["loss"] / t["n"]
        if task == "mrfr":
            if feat_sum is None:     # no real batch on this rank
                feat_sum = torch.zeros(int(ctx.cfg.get("img_dim") or 2048), dtype=torch.float64)
            if ctx.world_size > 1:
                import torch.distributed as dist
                dist.all_reduce(feat_sum)
            # mean over regions of sum_d (x_d - mean_d)^2 / D
            d = feat_sum.numel()
            base = (t["sq"] - float((feat_sum * feat_sum).sum()) / t["n"] / d) / t["n"]
            logs[f"{name}/mean_baseline"] = base
            logs[f"{name}/loss_vs_mean"] = logs[f"{name}/loss"] / max(base, 1e-12)
            continue
        logs[f"{name}/acc"] = t["correct"] / t["n"]
        if task in ("mlm", "itm"):
            logs[f"{name}/acc_majority"] = _majority(_reduce_counts(labels_seen, ctx.world_size))
        n_obj_classes = None
        if task == "mlm" and obj_range:
            n_obj_classes = obj_range[1] - obj_range[0]
        elif task in ("mrc", "mrc-kl"):
            n_obj_classes = label_space - 1
        if n_obj_classes and t["obj_n"] > 0:
            logs[f"{name}/obj_acc"] = t["obj_correct"] / t["obj_n"]
            logs[f"{name}/obj_acc_chance"] = 1.0 / n_obj_classes
            logs[f"{name}/obj_acc_majority"] = _majority(_reduce_counts(obj_seen, ctx.world_size))
    return logs


def _validate_wra(engine, name, loader, ctx) -> Dict[str, float]:
    model = engine.module
    sums: Dict[str, float] = defaultdict(float)
    pairs: Dict[int, Dict[int, float]] = defaultdict(dict)
    for b, real in val_batches(loader, ctx):
        if not real:
            transport_plan(model, b)
            continue
        _wra_sums(model, b, sums, pairs)
    full = [p for p in pairs.values() if 0 in p and 1 in p]
    sums["pair_correct"] = float(sum(p[1] < p[0] for p in full))
    sums["pair_n"] = float(len(full))
    keys = ("pos", "n_pos", "neg", "n_neg", "align_correct", "align_n", "align_chance",
            "phrase_correct", "phrase_n", "pair_correct", "pair_n")
    t = reduce_sums(sums, keys, ctx.world_size)
    logs = {}
    if t["n_pos"]:
        logs[f"{name}/ot_pos"] = t["pos"] / t["n_pos"]
    if t["n_neg"]:
        logs[f"{name}/ot_neg"] = t["neg"] / t["n_neg"]
    if t["pair_n"]:
        logs[f"{name}/ot_pair_acc"] = t["pair_correct"] / t["pair_n"]
        logs[f"{name}/ot_pair_acc_chance"] = 0.5
    if t["align_n"]:
        logs[f"{name}/align_acc"] = t["align_correct"] / t["align_n"]
        logs[f"{name}/align_acc_chance"] = t["align_chance"] / t["align_n"]
    if t["phrase_n"]:
        logs[f"{name}/phrase_align_acc"] = t["phrase_correct"] / t["phrase_n"]
    return logs


# ----------------------------------------------------------------------------- summary
def _lookup(logs: Dict[str, float], metric: str, dataset: str) -> Optional[float]:
    """``itm/acc`` -> logs['itm_<dataset>/acc'] (``mrckl`` also matches ``mrc-kl``)."""
    task, m = metric.split("/")
    for t in ((task, "mrc-kl") if task == "mrckl" else (task,)):
        v = logs.get(f"{t}_{dataset}/{m}")
        if v is not None:
            return v
    return None


def summary_rows(logs: Dict[str, float], with_targets: bool = True) -> List[Dict[str, Any]]:
    """One row per (objective, validation dataset): value, baseline, target, pass."""
    datasets = sorted({k.split("/")[0].split("_", 1)[1] for k in logs if "_" in k.split("/")[0]})
    rows = []
    for ds in datasets:
        for label, metric, base, rule, thr in TARGETS:
            v = _lookup(logs, metric, ds)
            if v is None:
                continue
            b = _lookup(logs, base, ds) if base else None
            if rule == "min":
                target, ok = f">= {thr:g}", v >= thr
            elif rule == "ratio_max":
                target = f"<= {thr:g} x baseline"
                ok = b is not None and v <= thr * b
            else:   # report
                target, ok = None, None
            row = {"objective": label, "dataset": ds, "metric": metric, "value": v,
                   "baseline": b}
            if metric == "wra/ot_pair_acc":
                row["ot_pos"] = _lookup(logs, "wra/ot_pos", ds)
                row["ot_neg"] = _lookup(logs, "wra/ot_neg", ds)
            if with_targets and target is not None:
                row.update(target=target, ok=bool(ok))
            rows.append(row)
    return rows


def format_summary(rows: List[Dict[str, Any]]) -> str:
    """A plain-text table of :func:`summary_rows`."""
    if not rows:
        return "no validation metrics"
    head = f"{'objective':<24} {'metric':<20} {'value':>8} {'baseline':>9}  target"
    lines = [head, "-" * len(head)]
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.4f}"
        tgt = f"{'(no target)':<22}   " if "target" not in r else ""
        if "target" in r:
            tgt = f"{r['target']:<22} {'ok' if r['ok'] else 'MISSED'}"
        extra = ""
        if r.get("ot_pos") is not None and r.get("ot_neg") is not None:
            extra = f"  (OT distance matched {r['ot_pos']:.4f} vs mismatched {r['ot_neg']:.4f})"
        lines.append(f"{r['objective']:<24} {r['metric']:<20} {r['value']:>8.4f} {base:>9}  "
                     f"{tgt}{extra}")
    return "\n".join(lines)
