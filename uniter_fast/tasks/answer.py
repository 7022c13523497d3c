"""The kind of task that picks one answer per example from the logits of a token-bucket
batch (VQA, VE, NLVR2): :class:`AnswerTask` does the loaders, the loss, validation and
inference; a task of this kind supplies its datasets, answers, metrics and file formats.
"""
from __future__ import annotations

import abc
import argparse
import io
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..constants import BUCKET_SIZE
from ..data.db import TxtTokLmdb, open_img_db
from ..data.loader import TaskLoader, move_to_device
from ..data.sampler import TokenBucketSampler
from ..evaluation import answer_scores
from ..files import atomic_write
from ..training.task import RunContext
from ..training.validation import reduce_sums, val_batches
from .base import (
    FinetuneTask,
    gather_lists,
    token_bucket_train_loader,
    token_bucket_val_loaders,
)
from .inference import Progress, amp_dtype, claim_outputs, db_name, load_strict, load_weights

__all__ = ["AnswerTask", "validate_answers", "infer_answers", "soft_score_metrics",
           "DEFAULT_BATCH_TOKENS"]

#: the original inf scripts' default batch (tokens)
DEFAULT_BATCH_TOKENS = 8192
#: the counters summed over ranks at validation
_COUNTERS = ("loss", "score", "correct", "n")


def soft_score_metrics(logits, batch, sums: Dict[str, float]) -> None:
    """A labelled batch of soft-score targets (VQA, VE): summed BCE, VQA score, count."""
    t = batch["targets"].float()
    sums["loss"] += float(F.binary_cross_entropy_with_logits(logits, t, reduction="sum"))
    sums["score"] += float(answer_scores(logits, t).sum())
    sums["n"] += t.size(0)


def _row_targets(targets, n: int) -> List[Any]:
    if targets is None:
        return [None] * n
    if targets.dim() == 1:
        return [int(t) for t in targets.tolist()]
    return [None] * n


def validate_answers(task, engine, val_loaders, ctx: RunContext) -> Dict[str, float]:
    """Every split's metrics (``task.finish_metrics`` of the summed ``task.batch_metrics``)
    and its result file (``task.write_results``, rank 0), answers gathered over ranks."""
    logs: Dict[str, float] = {}
    for split, loader in val_loaders.items():
        sums: Dict[str, float] = defaultdict(float)
        results: List[Tuple[str, Any, Any]] = []
        for b, real in val_batches(loader, ctx):
            qids = b.pop("qids")
            targets = b.get("targets")
            logits = engine(b, compute_loss=False).float()
            if not real:
                continue
            preds = task.predict(logits)
            if targets is not None:
                task.batch_metrics(logits, b, sums)
            results.extend(zip(qids, preds, _row_targets(targets, len(qids))))
        results = gather_lists(results, ctx.world_size)
        # every rank reduces the same counters (a rank without labelled batches has none)
        tot = reduce_sums(sums, _COUNTERS, ctx.world_size)
        logs.update(task.finish_metrics(tot, results, split))
        if ctx.rank == 0:
            task.write_results(os.path.join(ctx.output_dir, "results"), split, ctx.step,
                               [(q, p) for q, p, _ in results])
    return logs


def _default_output(task, source, txt_db: str) -> str:
    db = db_name(txt_db)
    if source.kind == "deepspeed":
        return os.path.join(source.run_dir, "results_test",
                            f"results_{source.tag}_{db}_all.{task.result_ext}")
    return f"{os.path.splitext(source.where)[0]}_results_{task.name}_{db}.{task.result_ext}"


def infer_answers(task, args: argparse.Namespace, cfg: Dict[str, Any], source,
                  device: torch.device, weights: Optional[Dict[str, torch.Tensor]] = None
                  ) -> Dict[str, Any]:
    """The task model with ``source``'s weights (``weights``: already loaded) over
    ``args.txt_db``/``args.img_db`` in token buckets: the answers to ``args.output`` (the
    original's format), the task metric when the db has labels, the logits with
    ``--save_logits``."""
    out = args.output or _default_output(task, source, args.txt_db)
    logits_path = os.path.splitext(out)[0] + "_logits.npz"
    claim_outputs([out] + ([logits_path] if getattr(args, "save_logits", False) else []),
                  args.overwrite)
    sd = load_weights(source) if weights is None else weights
    model = load_strict(task.blank_model(cfg), sd, source.where, cfg)
    model.to(device).eval()
    txt_db = TxtTokLmdb(args.txt_db, -1)
    dataset = task.dataset(txt_db, open_img_db(args.img_db, cfg), False, 0, 1, 0)
    batch_tokens = int(args.batch_size or cfg.get("val_batch_size") or DEFAULT_BATCH_TOKENS)
    loader = TaskLoader(dataset, task.collate(False),
                        TokenBucketSampler(BUCKET_SIZE, batch_tokens, droplast=False),
                        num_workers=args.n_workers)
    dtype = amp_dtype(args.precision)
    results: List[Tuple[str, str]] = []
    logits_out: Dict[str, Any] = {}
    sums: Dict[str, Any] = {"score": 0.0, "n": 0, "labelled": []}
    bar = Progress(len(dataset), not args.no_progress, unit="ex", desc=f"{task.name} inference")
    with torch.no_grad():
        for batch in loader.epoch_batches(0):
            qids = batch.pop("qids")
            targets = batch.get("targets")
            batch = move_to_device(batch, device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(batch, compute_loss=False).float()
            preds = task.predict(logits)
            results.extend(zip(qids, preds))
            if getattr(args, "save_logits", False):
                for q, row in zip(qids, logits.half().cpu().numpy()):
                    logits_out[str(q)] = row
            if targets is not None:
                task.labelled_metrics(logits.cpu(), targets, qids, preds, sums)
                sums["n"] += len(qids)
            bar(len(qids))
    bar.close()
    task.write_predictions(out, results)
    summary: Dict[str, Any] = {"task": task.name, "output": out, "n": len(results)}
    if getattr(args, "save_logits", False):
        import numpy as np
        buf = io.BytesIO()
        np.savez(buf, **logits_out)
        atomic_write(logits_path, buf.getvalue())
        summary["logits"] = logits_path
    if sums["n"]:
        summary.update(task.summary_metrics(sums))
    return summary


class AnswerTask(FinetuneTask):
    """A task that answers each example from its logits (token-bucket batches of
    ``dataset``/``collate``; the model's own ``reduce_loss``)."""

    reinit_unseen_words = True
    infer_batch_help = f"tokens per batch (default: val_batch_size or {DEFAULT_BATCH_TOKENS})"
    #: extension of the result files (``json``, ``csv``)
    result_ext = "json"

    # ---------------------------------------------------------------- what the task supplies
    @abc.abstractmethod
    def dataset(self, txt_db, img_db, train: bool, rank: int, world_size: int, seed: int):
        """The dataset of one text db and its image db (training or evaluation)."""

    @abc.abstractmethod
    def collate(self, train: bool):
        """The collate function of :meth:`dataset`'s examples."""

    @abc.abstractmethod
    def predict(self, logits) -> List[Any]:
        """The answers (as the result files write them) of a batch of logits."""

    @abc.abstractmethod
    def batch_metrics(self, logits, batch, sums: Dict[str, float]) -> None:
        """Add a labelled validation batch to the counters ``sums`` (loss, score, correct, n)."""

    @abc.abstractmethod
    def finish_metrics(self, sums, results, split: str) -> Dict[str, float]:
        """``{"<split>/<metric>": value}`` from the summed counters and ``(id, answer,
        target)`` results of every rank."""

    @abc.abstractmethod
    def write_results(self, out_dir: str, split: str, step: int, results) -> str:
        """Write a validation's ``(id, answer)`` results as the original does."""

    @abc.abstractmethod
    def labelled_metrics(self, logits, targets, qids, preds, sums: Dict[str, Any]) -> None:
        """Add a labelled inference batch to ``sums`` ("score" and "labelled")."""

    @abc.abstractmethod
    def summary_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        """The metrics inference prints, from :meth:`labelled_metrics`' sums."""

    @abc.abstractmethod
    def write_predictions(self, path: str, results) -> None:
        """Write inference's ``(id, answer)`` results in the original's format."""

    # ---------------------------------------------------------------- what it gets
    def train_loader(self, cfg, rank, world_size, accum_steps):
        return token_bucket_train_loader(
            self.name, cfg, rank, world_size, accum_steps,
            lambda t, i, r, w, s: self.dataset(t, i, True, r, w, s), self.collate(True))

    def val_loaders(self, cfg, rank, world_size):
        return token_bucket_val_loaders(
            cfg, self.splits(cfg), rank, world_size,
            lambda t, i, r, w, s: self.dataset(t, i, False, r, w, s), self.collate(False))

    def compute_loss(self, engine, name, batch, cfg):
        return engine.module.reduce_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["targets"].size(0))

    def validate(self, engine, val_loaders, ctx):
        return validate_answers(self, engine, val_loaders, ctx)

    def add_infer_args(self, parser):
        parser.add_argument("--output", default=None,
                            help="result file (default: <run dir>/results_test/results_<tag>_"
                                 "<txt db>_all.<ext>, for a .pt: next to it)")
        parser.add_argument("--n_workers", type=int, default=0)

    def infer(self, args, cfg, source, device, weights=None):
        return infer_answers(self, args, cfg, source, device, weights)

    # ---------------------------------------------------------------- predict
    def predict_item(self, request: Dict[str, Any], ctx) -> Dict[str, Any]:
        """The eval dataset's item of one ``python -m uniter_fast.predict`` request."""
        raise ValueError(f"task {self.name} has no predict")

    def predict_answer(self, logits, ctx) -> Dict[str, Any]:
        """The answer (``answer``, ``score``, ``top``) of one example's logits."""
        raise ValueError(f"task {self.name} has no predict")

    def predict_requests(self, model, requests, ctx):
        """Items as the eval dataset's, batched with :meth:`collate` (``False``), the logits
        as inference computes them, answered by :meth:`predict_answer`."""
        items = [self.predict_item(r, ctx) for r in requests]
        collate = self.collate(False)
        out: List[Dict[str, Any]] = []
        for chunk in ctx.chunks(items):
            batch = collate(list(chunk))
            batch.pop("qids")
            out.extend(self.predict_answer(row, ctx) for row in ctx.run(model, batch))
        return out


def text_image_item(request: Dict[str, Any], name: str, ctx) -> Dict[str, Any]:
    """The VQA/VE eval item of a request: ``[CLS] <field name> [SEP]`` and its one image."""
    row, _ = ctx.text_row(request[name], request["where"], name)
    feat, pos = ctx.image_inputs(request["images"][0])
    input_ids = torch.tensor(row)
    return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
            "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
            "targets": None, "qid": request["id"]}


def ranked_labels(scores, names, k: int, logits=None) -> List[Dict[str, Any]]:
    """The ``k`` best ``{"answer", "score"[, "logit"]}`` of a score vector, best first."""
    k = min(int(k), scores.numel())
    top = scores.topk(k)
    out = []
    for s, i in zip(top.values.tolist(), top.indices.tolist()):
        item = {"answer": names[i], "score": float(s)}
        if logits is not None:
            item["logit"] = float(logits[i])
        out.append(item)
    return out


def text_image_alignment(request: Dict[str, Any], name: str, collate, ctx):
    """``predict_alignment`` of a one-image request: ``[CLS] <field> [SEP]`` and the image."""
    _, words = ctx.text_row(request[name], request["where"], name)
    batch = collate([text_image_item(request, name, ctx)])
    batch.pop("qids", None)
    n = request["images"][0].num_boxes
    return batch, words, [[(0, r) for r in range(n)]]
