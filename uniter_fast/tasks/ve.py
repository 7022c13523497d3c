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

from ..constants import IMG_DIM
from ..data.synthetic_tasks import ve as synthetic_ve
from ..data.ve import VeDataset, VeEvalDataset, ve_collate, ve_eval_collate
from ..evaluation import answer_scores
from ..files import atomic_write
from ..model.build import model_config_path, set_dropout
from ..model.ve import VE_IDX2ENT, UniterForVisualEntailment
from .answer import AnswerTask, soft_score_metrics
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
