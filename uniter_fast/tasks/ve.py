"""Visual entailment (SNLI-VE, ``train_ve.py``): the VQA head and loss over the three
labels (contradiction, entailment, neutral), accuracy of the arg-max label.

Config: the original's ``train-ve-base-2gpu.json`` keys.  Validation results:
``results/{split}_results_{step}_all.json`` ``{id: label}`` as the original's
per-validation files; inference writes the same format (the original has no VE
inference script).  Synthetic data: :mod:`uniter_fast.data.synthetic_tasks.ve`.
"""
from __future__ import annotations

import json
import os

import torch

from ..constants import IMG_DIM
from ..data.synthetic_tasks import ve as synthetic_ve
from ..data.ve import VeDataset, VeEvalDataset, ve_collate, ve_eval_collate
from ..evaluation import answer_scores
from ..files import atomic_write
from ..model.build import model_config_path, set_dropout
from ..model.ve import VE_ENT2IDX, VE_IDX2ENT, UniterForVisualEntailment
from ..prepro import BAD_VALUE, Prepared, read_jsonl, require
from .answer import (
    AnswerTask,
    ranked_labels,
    soft_score_metrics,
    text_image_alignment,
    text_image_item,
)
from .inference import write_json


class VeTask(AnswerTask):
    name = "ve"
    head_prefixes = ("vqa_output",)
    synthetic_data = synthetic_ve
    result_ext = "json"

    def make_model(self, cfg, state=None):
        model = UniterForVisualEntailment.from_pretrained(
            model_config_path(cfg), state, img_dim=int(cfg.get("img_dim") or IMG_DIM))
        set_dropout(model, cfg.get("dropout"))
        return model

    # ---------------------------------------------------------------- data
    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        cls = VeDataset if train else VeEvalDataset
        return cls(txt_db, img_db, rank=rank, world_size=world_size, seed=seed)

    def collate(self, train):
        return ve_collate if train else ve_eval_collate

    # ---------------------------------------------------------------- validation
    def predict(self, logits):
        return [VE_IDX2ENT[i] for i in logits.argmax(-1).tolist()]

    def batch_metrics(self, logits, b, sums):
        soft_score_metrics(logits, b, sums)

    def finish_metrics(self, tot, results, split):
        if tot["n"] == 0:
            return {}
        return {f"{split}/loss": tot["loss"] / tot["n"], f"{split}/acc": tot["score"] / tot["n"]}

    def write_results(self, out_dir, split, step, results):
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{split}_results_{step}_all.json")
        atomic_write(path, json.dumps({q: a for q, a in results}))
        return path

    # ---------------------------------------------------------------- inference

    def labelled_metrics(self, logits, targets, qids, preds, sums):
        sums["score"] += float(answer_scores(logits, targets.float()).sum())

    def summary_metrics(self, sums):
        return {"acc": sums["score"] / sums["n"]}

    def write_predictions(self, path, results):
        write_json(path, {q: a for q, a in results})

    # ---------------------------------------------------------------- predict
    predict_fields = {"hypothesis": ("text", True, "VE: the hypothesis (SNLI-VE's sentence2) "
                                                   "about the image")}

    def predict_item(self, request, ctx):
        return text_image_item(request, "hypothesis", ctx)

    def predict_answer(self, logits, ctx):
        """The three labels by the head's sigmoid (VE is trained as VQA, BCE per label);
        the answer is the arg-max, as inference writes it."""
        top = ranked_labels(torch.sigmoid(logits), VE_IDX2ENT, len(VE_IDX2ENT), logits)
        return {"answer": top[0]["answer"], "score": top[0]["score"], "top": top}

    def predict_alignment(self, request, answer, ctx):
        return text_image_alignment(request, "hypothesis", self.collate(False), ctx)

    def predict_picture(self, request, answer):
        return {"title": [f"hypothesis: {request['hypothesis']}", f"-> {answer['answer']}"],
                "ranked": [(t["answer"], t["score"]) for t in answer["top"]], "highlight": []}

    # ---------------------------------------------------------------- preprocessing
    prepro_formats = {"snli-ve": "SNLI-VE's JSON-lines files (snli_ve_train.jsonl, ...: "
                                 "Flikr30kID, sentence2, gold_label, pairID)"}

    def prepro(self, files, fmt, args, ctx):
        """VE records, keyed by ``pairID``: ``pairID``, ``Flikr30kID``, ``captionID``,
        ``sentence2`` (the hypothesis: ``input_ids``), ``gold_label``, ``img_fname`` (the
        key of the Flickr30k image) and ``target = {"labels": [label], "scores": [1.0]}``
        with the labels of :data:`~uniter_fast.model.ve.VE_ENT2IDX` (contradiction 0,
        entailment 1, neutral 2); a line without ``gold_label`` is unlabelled (no
        ``target``)."""
        return Prepared(self._prepro_examples(files, ctx))

    def _prepro_examples(self, files, ctx):
        for path in files:
            lines = read_jsonl(path, ctx.report)
            for where, ex in ctx.bar(lines, f"SNLI-VE {os.path.basename(path)}"):
                if not require(ex, ("pairID", "Flikr30kID", "sentence2"), where, ctx.report,
                               {"pairID": (str, int), "Flikr30kID": (str, int)}):
                    continue
                label = ex.get("gold_label")
                if "gold_label" in ex and label not in VE_ENT2IDX:
                    ctx.bad(where, BAD_VALUE, f"gold_label {label!r} is not one of "
                            f"{sorted(VE_ENT2IDX)}")
                    continue
                key = ctx.image_key(str(ex["Flikr30kID"]), where)
                if key is None or not ctx.image(key, where):
                    continue
                input_ids = ctx.tokens(ex["sentence2"], where, "sentence2")
                if input_ids is None:
                    continue
                rec = {k: ex[k] for k in _VE_FIELDS if k in ex}
                rec["input_ids"] = input_ids
                rec["img_fname"] = key
                if "gold_label" in ex:
                    rec["target"] = {"labels": [VE_ENT2IDX[label]], "scores": [1.0]}
                yield where, str(ex["pairID"]), rec


#: the SNLI-VE fields a record keeps (the premise's parse trees and the like are left out)
_VE_FIELDS = ("pairID", "Flikr30kID", "captionID", "sentence2", "gold_label")
