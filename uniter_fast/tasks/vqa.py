"""VQA (``train_vqa.py``, ``inf_vqa.py``): BCE over the answer vocabulary with soft scores,
the VQA score of the arg-max answer.

Config: the original's ``train-vqa-base-4gpu.json`` keys; ``lr_mul`` defaults to 10 (the
head learns 10x faster); ``ans2label`` (this package's key) names the answer vocabulary
(default: the shipped 3129 answers), written to ``ckpt/ans2label.json`` as the original.
Validation results: ``results/results_{step}_all.json`` ``{question_id: answer}``
(``results/test_results_...`` for the test split).  Inference writes the evaluation
server's ``[{"answer", "question_id"}]``; ``--save_logits`` also the logits (``.npz``).
Synthetic data: :mod:`uniter_fast.data.synthetic_tasks.vqa`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from ..constants import IMG_DIM
from ..data.synthetic_tasks import vqa as synthetic_vqa
from ..data.vqa import VqaDataset, VqaEvalDataset, load_ans2label, vqa_collate, vqa_eval_collate
from ..evaluation import answer_scores
from ..files import atomic_write
from ..model.build import model_config_path, set_dropout
from ..model.vqa import UniterForVisualQuestionAnswering
from .answer import AnswerTask, soft_score_metrics
from .inference import load_weights, write_json

#: the answer vocabulary beside a run's checkpoints (as the original)
ANS2LABEL_FILE = "ans2label.json"


def _qid(q: str):
    try:
        return int(q)
    except (TypeError, ValueError):
        return q


def answer_head_rows(sd: Dict[str, Any]) -> Optional[int]:
    """How many answers the checkpoint's VQA head scores (its last layer's rows)."""
    heads = sorted((k for k in sd if k.startswith("vqa_output.") and k.endswith(".weight")
                    and sd[k].dim() == 2), key=lambda k: int(k.split(".")[1]))
    return int(sd[heads[-1]].shape[0]) if heads else None


def check_same_answers(given: str, run_path: str) -> None:
    """``--ans2label`` must be the run's own answer vocabulary (the same answers under the
    same ids): another order would rename every answer silently."""
    a, b = load_ans2label(given), load_ans2label(run_path)
    if a == b:
        return
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = []
    if only_a or only_b:
        parts.append(f"answers only in --ans2label: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}"
                     f", only in the run's: {only_b[:5]}{' ...' if len(only_b) > 5 else ''}")
    if moved:
        k = moved[0]
        parts.append(f"{len(moved)} answers have other ids (e.g. {k!r}: {a[k]} in --ans2label, "
                     f"{b[k]} in the run's)")
    raise ValueError(f"--ans2label {given} is not the answer vocabulary the run was trained with "
                     f"({run_path}): {'; '.join(parts)}. Leave --ans2label out to use the run's")


class VqaTask(AnswerTask):
    name = "vqa"
    head_prefixes = ("vqa_output",)
    default_lr_mul = 10.0
    synthetic_data = synthetic_vqa
    result_ext = "json"

    def __init__(self):
        super().__init__()
        self._ans2label: Optional[Dict[str, int]] = None

    # ---------------------------------------------------------------- answers
    def use_answers(self, ans2label: Dict[str, int]) -> None:
        self._ans2label = dict(ans2label)
        self._label2ans = {v: k for k, v in self._ans2label.items()}

    def ans2label(self, cfg: Dict[str, Any]) -> Dict[str, int]:
        """The answer vocabulary (the config's ``ans2label``, else the shipped one)."""
        if self._ans2label is None:
            self.use_answers(load_ans2label(cfg.get("ans2label")))
        return self._ans2label

    def configure(self, cfg, ds_config, args):
        super().configure(cfg, ds_config, args)
        self.ans2label(cfg)           # every rank: the head's size and the answer names

    def write_run_files(self, cfg, ckpt_dir):
        with open(os.path.join(ckpt_dir, ANS2LABEL_FILE), "w") as f:
            json.dump(self.ans2label(cfg), f)

    # ---------------------------------------------------------------- model
    def make_model(self, cfg, state=None):
        model = UniterForVisualQuestionAnswering.from_pretrained(
            model_config_path(cfg), state, img_dim=int(cfg.get("img_dim") or IMG_DIM),
            num_answer=len(self.ans2label(cfg)))
        set_dropout(model, cfg.get("dropout"))
        return model

    def model_for_checkpoint(self, cfg, ckpt_dir):
        path = os.path.join(ckpt_dir, ANS2LABEL_FILE)
        if os.path.exists(path):
            self.use_answers(load_ans2label(path))
        return self.blank_model(cfg)

    # ---------------------------------------------------------------- data
    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        cls = VqaDataset if train else VqaEvalDataset
        return cls(len(self._ans2label), txt_db, img_db, rank=rank, world_size=world_size,
                   seed=seed)

    def collate(self, train):
        return vqa_collate if train else vqa_eval_collate

    # ---------------------------------------------------------------- validation
    def predict(self, logits):
        return [self._label2ans[i] for i in logits.argmax(-1).tolist()]

    def batch_metrics(self, logits, b, sums):
        soft_score_metrics(logits, b, sums)

    def finish_metrics(self, tot, results, split):
        if tot["n"] == 0:
            return {}
        return {f"{split}/loss": tot["loss"] / tot["n"], f"{split}/score": tot["score"] / tot["n"]}

    def write_results(self, out_dir, split, step, results):
        os.makedirs(out_dir, exist_ok=True)
        prefix = "" if split == "val" else f"{split}_"
        path = os.path.join(out_dir, f"{prefix}results_{step}_all.json")
        atomic_write(path, json.dumps({q: a for q, a in results}))
        return path

    # ---------------------------------------------------------------- inference
    def add_infer_args(self, parser):
        super().add_infer_args(parser)
        parser.add_argument("--ans2label", default=None,
                            help="answer vocabulary JSON (default: the run's ckpt/"
                                 "ans2label.json, else the config's, else the shipped one)")
        parser.add_argument("--save_logits", action="store_true",
                            help="also write the logits (.npz, fp16, keyed by question id)")

    def infer_config(self, cfg, args):
        if args.ans2label is not None:
            cfg["ans2label"] = args.ans2label

    def infer(self, args, cfg, source, device):
        run_path = (os.path.join(source.run_dir, "ckpt", ANS2LABEL_FILE)
                    if source.run_dir else None)
        if run_path is not None and not os.path.exists(run_path):
            run_path = None
        given = args.ans2label
        if given is not None and run_path is not None:
            check_same_answers(given, run_path)
        path = given or run_path or cfg.get("ans2label")      # the run's first, as inf_vqa.py
        answers = load_ans2label(path)
        sd = load_weights(source)
        rows = answer_head_rows(sd)
        if rows is not None and rows != len(answers):
            what = (f"--ans2label {given}" if given is not None else
                    f"the answer vocabulary {path or 'shipped with uniter_fast'}")
            raise ValueError(f"{what} has {len(answers)} answers, but the answer head of "
                             f"checkpoint {source.where} has {rows} rows: give the answer "
                             "vocabulary the model was trained with (--ans2label)")
        self.use_answers(answers)
        return super().infer(args, cfg, source, device, weights=sd)

    def labelled_metrics(self, logits, targets, qids, preds, sums):
        sums["score"] += float(answer_scores(logits, targets.float()).sum())

    def summary_metrics(self, sums):
        return {"score": sums["score"] / sums["n"]}

    def write_predictions(self, path, results):
        write_json(path, [{"answer": a, "question_id": _qid(q)} for q, a in results])
