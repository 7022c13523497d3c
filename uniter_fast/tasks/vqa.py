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

import torch

from ..constants import IMG_DIM
from ..data.synthetic_tasks import vqa as synthetic_vqa
from ..data.vqa import VqaDataset, VqaEvalDataset, load_ans2label, vqa_collate, vqa_eval_collate
from ..evaluation import answer_scores
from ..files import atomic_write
from ..model.build import model_config_path, set_dropout
from ..model.vqa import UniterForVisualQuestionAnswering
from ..prepro import (
    BAD_VALUE,
    DUPLICATE_ID,
    MISSING_FIELD,
    UNKNOWN_ANSWER,
    UNKNOWN_REFERENCE,
    Prepared,
    PreproError,
    at_index,
    normalize_answer,
    read_annotation,
    records,
    require,
    soft_score,
)
from .answer import (
    AnswerTask,
    ranked_labels,
    soft_score_metrics,
    text_image_alignment,
    text_image_item,
)
from .inference import load_strict, load_weights, write_json

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
        sd = self._answers_and_weights(args, cfg, source)
        return super().infer(args, cfg, source, device, weights=sd)

    def _answers_and_weights(self, args, cfg, source):
        """The answer vocabulary (``--ans2label``, else the run's, else the config's; checked
        against the head) put to use, and the weights of ``source``."""
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
        return sd

    # ---------------------------------------------------------------- predict
    predict_fields = {"question": ("text", True, "VQA: the question")}

    def add_predict_args(self, parser):
        super().add_predict_args(parser)
        parser.add_argument("--ans2label", default=None,
                            help="VQA: answer vocabulary JSON (default: the run's ckpt/"
                                 "ans2label.json, else the config's, else the shipped one)")

    def predict_model(self, args, cfg, source):
        sd = self._answers_and_weights(args, cfg, source)
        return load_strict(self.blank_model(cfg), sd, source.where, cfg)

    def predict_item(self, request, ctx):
        return text_image_item(request, "question", ctx)

    def predict_answer(self, logits, ctx):
        """The top answers by the head's sigmoid (the VQA loss is BCE per answer); the
        answer is the arg-max, as inference writes it."""
        top = ranked_labels(torch.sigmoid(logits), self._label2ans, ctx.top_k, logits)
        return {"answer": top[0]["answer"], "score": top[0]["score"], "top": top}

    def predict_alignment(self, request, answer, ctx):
        return text_image_alignment(request, "question", self.collate(False), ctx)

    def predict_picture(self, request, answer):
        return {"title": [f"Q: {request['question']}", f"A: {answer['answer']}"],
                "ranked": [(t["answer"], t["score"]) for t in answer["top"]], "highlight": []}

    def labelled_metrics(self, logits, targets, qids, preds, sums):
        sums["score"] += float(answer_scores(logits, targets.float()).sum())

    def summary_metrics(self, sums):
        return {"score": sums["score"] / sums["n"]}

    def write_predictions(self, path, results):
        write_json(path, [{"answer": a, "question_id": _qid(q)} for q, a in results])

    # ---------------------------------------------------------------- preprocessing
    prepro_formats = {
        "vqa": "VQA v2's questions JSON (v2_OpenEnded_mscoco_<split>_questions.json) and, for "
               "a labelled split, its annotations JSON (v2_mscoco_<split>_annotations.json)",
        "jsonl": "JSON lines {image, question, answers (the annotators' answers; absent: "
                 "unlabelled), question_id (optional)}"}

    def add_prepro_args(self, parser):
        parser.add_argument("--ans2label", default=None,
                            help="VQA: the answer vocabulary (JSON answer -> id 0..n-1, e.g. "
                                 "uniter_fast/data/ans2label.json, the original's 3129 "
                                 "answers); an answer outside it is reported. Default: built "
                                 "from the annotations (--min_answer_count)")
        parser.add_argument("--min_answer_count", type=int, default=DEFAULT_MIN_ANSWER_COUNT,
                            help="VQA, building the vocabulary: keep the answers that are the "
                                 "most common answer of at least this many questions (default "
                                 f"{DEFAULT_MIN_ANSWER_COUNT}, bottom-up-attention's threshold)")

    def prepro(self, files, fmt, args, ctx):
        """VQA records: ``question_id``, ``image_id``, ``question`` (and the annotation's
        ``answer_type``, ``question_type``, ``multiple_choice_answer``), or a JSON line's
        fields as they are, plus ``input_ids``, ``img_fname`` and, for a labelled question,
        ``target = {"labels": [answer ids], "scores": [min(#annotators / 3, 1)]}`` over its
        answers after the official normalisation (:func:`~uniter_fast.prepro.
        normalize_answer`), keyed by question id; ``ans2label.json`` beside them."""
        questions, annotations, lines = [], [], []
        for path in files:
            kind, doc = ("jsonl", None) if fmt == "jsonl" else read_annotation(path)
            if isinstance(doc, dict) and "questions" in doc:
                questions.append((path, doc))
            elif isinstance(doc, dict) and "annotations" in doc:
                annotations.append((path, doc))
            elif fmt == "vqa":
                raise PreproError(f"{path}: neither a VQA questions JSON ('questions') nor an "
                                  "annotations JSON ('annotations')")
            else:
                lines.append((path, kind, doc))
        if annotations and not questions:
            raise PreproError("VQA annotations JSON without its questions JSON: give both")
        anns, skip = self._vqa_annotations(annotations, ctx)
        items, seen = [], {}
        for path, doc in questions:
            items.extend(self._vqa_questions(path, doc, anns, skip, seen, bool(annotations),
                                             ctx))
        for qid, (where, _) in anns.items():
            ctx.bad(where, UNKNOWN_REFERENCE, f"no question {qid!r} in the questions JSON",
                    "left out")
        counter = [0]
        for path, kind, doc in lines:
            items.extend(self._vqa_lines(path, kind, doc, counter, ctx))
        given = getattr(args, "ans2label", None)
        if given:
            ans2label = load_ans2label(given)
        else:
            ans2label = _build_ans2label(items, getattr(args, "min_answer_count",
                                                        DEFAULT_MIN_ANSWER_COUNT))
        prepared = Prepared([], files={ANS2LABEL_FILE: ans2label},
                            meta={"num_answers": len(ans2label)})
        prepared.examples = _vqa_records(items, ans2label, bool(given), ctx)
        return prepared

    @staticmethod
    def _vqa_annotations(docs, ctx):
        """question id -> (where, normalised answers, annotation fields kept); the ids of
        annotations reported as bad."""
        anns, skip = {}, set()
        for path, doc in docs:
            if not isinstance(doc["annotations"], list):
                raise PreproError(f"{path}: 'annotations' is not a list")
            for i, a in enumerate(doc["annotations"]):
                where = at_index(path, "annotations", i)
                if not isinstance(a, dict):
                    ctx.bad(where, BAD_VALUE, "not an object")
                    continue
                qid = a.get("question_id")
                if not require(a, ("question_id", "answers"), where, ctx.report,
                               {"question_id": (int, str), "answers": list}):
                    if isinstance(qid, (int, str)):
                        skip.add(qid)            # its question goes with it
                    continue
                answers = _answers(a["answers"], where, ctx)
                if answers is None:
                    skip.add(qid)
                    continue
                if qid in anns:
                    ctx.bad(where, DUPLICATE_ID, f"question {qid!r} was annotated at "
                            f"{anns[qid][0]}; the first is kept", "left out")
                    continue
                keep = {k: a[k] for k in _ANNOTATION_FIELDS if k in a}
                anns[qid] = (where, (answers, keep))
        return anns, skip

    @staticmethod
    def _vqa_questions(path, doc, anns, skip, seen, labelled, ctx):
        data_type = doc.get("data_type", "mscoco")
        subtype = doc.get("data_subtype")
        if data_type not in _VQA_IMAGE_NAMES:
            raise PreproError(f"{path}: data_type {data_type!r}; VQA's are "
                              f"{sorted(_VQA_IMAGE_NAMES)}")
        if not isinstance(subtype, str) or not subtype:
            raise PreproError(f"{path}: no data_subtype (train2014, val2014, test2015, ...): "
                              "the image file names need it")
        if not isinstance(doc["questions"], list):
            raise PreproError(f"{path}: 'questions' is not a list")
        out = []
        qs = doc["questions"]
        for i, q in enumerate(ctx.bar(qs, f"VQA {os.path.basename(path)}", total=len(qs))):
            where = at_index(path, "questions", i)
            if not isinstance(q, dict):
                ctx.bad(where, BAD_VALUE, "not an object")
                continue
            if not require(q, ("question_id", "image_id", "question"), where, ctx.report,
                           {"image_id": int, "question_id": (int, str)}):
                if isinstance(q.get("question_id"), (int, str)):
                    anns.pop(q["question_id"], None)     # its annotation goes with it
                continue
            qid = q["question_id"]
            if qid in skip:
                continue                  # its annotation was reported
            if qid in seen:
                ctx.bad(where, DUPLICATE_ID, f"question {qid!r} was first at {seen[qid]}; "
                        "the first is kept")
                continue
            seen[qid] = where
            answers = None
            rec = {"question_id": qid, "image_id": q["image_id"], "question": q["question"]}
            if labelled:
                if qid not in anns:
                    ctx.bad(where, MISSING_FIELD, f"question {qid!r} has no annotation")
                    continue
                answers, keep = anns.pop(qid)[1]
                rec.update(keep)
            name = _VQA_IMAGE_NAMES[data_type].format(subtype=subtype, id=q["image_id"])
            item = _vqa_item(where, str(qid), rec, q["question"], name, answers,
                             rec.get("multiple_choice_answer"), ctx)
            if item is not None:
                out.append(item)
        return out

    @staticmethod
    def _vqa_lines(path, kind, doc, counter, ctx):
        """The items of a JSON-lines file; a line without ``question_id`` (or ``id``) is
        numbered: its place, from 0, among all the files' lines."""
        out = []
        for where, ex in ctx.bar(records(path, ctx.report, kind, doc),
                                 f"VQA {os.path.basename(path)}"):
            number = counter[0]
            counter[0] += 1
            if not require(ex, ("image", "question"), where, ctx.report, {"image": str}):
                continue
            answers = None
            if "answers" in ex:
                answers = _answers(ex["answers"], where, ctx)
                if answers is None:
                    continue
            qid = ex.get("question_id", ex.get("id"))
            qid = str(number) if qid is None else str(qid)
            item = _vqa_item(where, qid, ex, ex["question"], ex["image"], answers, None, ctx)
            if item is not None:
                out.append(item)
        return out


#: the default answer count of a built vocabulary (bottom-up-attention VQA's threshold)
DEFAULT_MIN_ANSWER_COUNT = 9
#: the fields of a VQA annotation a record keeps
_ANNOTATION_FIELDS = ("answer_type", "question_type", "multiple_choice_answer")
#: VQA's image file names by data_type
_VQA_IMAGE_NAMES = {"mscoco": "COCO_{subtype}_{id:012d}.jpg",
                    "abstract_v002": "abstract_v002_{subtype}_{id:012d}.png"}


def _answers(answers, where, ctx):
    """The normalised answers of an annotation's ``answers`` (strings or ``{"answer": ...}``
    objects), None (reported) when malformed."""
    if not isinstance(answers, list):
        ctx.bad(where, BAD_VALUE, f"answers is {answers!r:.60}, not a list")
        return None
    out = []
    for k, a in enumerate(answers):
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, str):
            ctx.bad(where, BAD_VALUE, f"answers[{k}] is not an answer string")
            return None
        out.append(normalize_answer(a))
    return out


def _vqa_item(where, qid, rec, question, image, answers, top, ctx):
    """(where, id, record without target, normalised answers or None, most common answer),
    or None (reported)."""
    key = ctx.image_key(image, where)
    if key is None or not ctx.image(key, where):
        return None
    input_ids = ctx.tokens(question, where, "question")
    if input_ids is None:
        return None
    rec = dict(rec, input_ids=input_ids, img_fname=key)
    if answers is not None:
        top = normalize_answer(top) if isinstance(top, str) else _most_common(answers)
    return where, qid, rec, answers, top


def _most_common(answers):
    counts = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _build_ans2label(items, min_count):
    """The answers that are the most common answer of at least ``min_count`` questions, in
    the order they first appear."""
    counts = {}
    for *_, answers, top in items:
        if answers is not None and top is not None:
            counts[top] = counts.get(top, 0) + 1
    ans2label = {}
    for a, n in counts.items():
        if n >= min_count:
            ans2label[a] = len(ans2label)
    if not ans2label:
        raise PreproError(f"no answer is the most common answer of {min_count} questions or "
                          "more: lower --min_answer_count or give --ans2label")
    return ans2label


def _vqa_records(items, ans2label, given, ctx):
    for where, qid, rec, answers, _ in items:
        if answers is not None:
            counts = {}
            for a in answers:
                counts[a] = counts.get(a, 0) + 1
            labels, scores = [], []
            for a, n in counts.items():
                if a in ans2label:
                    labels.append(ans2label[a])
                    scores.append(soft_score(n))
                elif given:
                    ctx.bad(where, UNKNOWN_ANSWER, f"{a!r} (question {qid})",
                            "left out of the target")
            rec["target"] = {"labels": labels, "scores": scores}
        yield where, qid, rec
