"""NLVR2 (``train_nlvr2.py``, ``inf_nlvr2.py``): cross-entropy over False/True on an image
pair; accuracy and consistency (every statement right on all its image pairs).

Config: the original's ``train-nlvr2-base-1gpu.json`` keys; ``model`` picks the variant
(``paired`` by default, ``triplet``, ``paired-attn``), ``use_img_type`` the image type
embeddings (off by default: the original's argparse defaults).  Validation results:
``results/{split}_results_{step}_all.csv`` lines ``identifier,True|False``; inference
writes the same CSV.  Synthetic data: :mod:`uniter_fast.data.synthetic_tasks.nlvr2`.
"""
from __future__ import annotations

import argparse
import csv
import io
import os

import torch
import torch.nn.functional as F

from ..constants import IMG_DIM
from ..data import nlvr2 as data
from ..data.synthetic_tasks import nlvr2 as synthetic_nlvr2
from ..evaluation import nlvr2_consistency
from ..files import atomic_write
from ..model import nlvr2 as models
from ..model.build import model_config_path, set_dropout
from ..prepro import (
    BAD_VALUE,
    MISSING_IMAGE,
    Prepared,
    PreproError,
    load_json,
    read_jsonl,
    require,
)
from .answer import AnswerTask, ranked_labels

#: the ``model`` values: the original's three NLVR2 models
NLVR2_MODELS = {"paired": models.UniterForNlvr2Paired, "triplet": models.UniterForNlvr2Triplet,
                "paired-attn": models.UniterForNlvr2PairedAttn}


def _csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for q, a in rows:
        w.writerow([q, a])
    return buf.getvalue()


class Nlvr2Task(AnswerTask):
    name = "nlvr2"
    head_prefixes = ("nlvr2_output", "attn1", "attn2", "fc", "attn_pool")
    synthetic_data = synthetic_nlvr2
    result_ext = "csv"

    def check_config(self, cfg):
        cfg.setdefault("model", "paired")
        if cfg["model"] not in NLVR2_MODELS:
            raise ValueError(f"training config model must be one of {tuple(NLVR2_MODELS)}, got "
                             f"{cfg['model']!r}")
        cfg["use_img_type"] = bool(cfg.get("use_img_type", False))
        self._variant, self._use_img_type = cfg["model"], cfg["use_img_type"]

    def make_model(self, cfg, state=None):
        cls = NLVR2_MODELS[cfg.get("model", "paired")]
        model = cls.from_pretrained(model_config_path(cfg), state,
                                    img_dim=int(cfg.get("img_dim") or IMG_DIM))
        model.init_type_embedding()
        set_dropout(model, cfg.get("dropout"))
        return model

    # ---------------------------------------------------------------- data
    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        paired = "paired" in self._variant
        cls = ((data.Nlvr2PairedDataset if train else data.Nlvr2PairedEvalDataset) if paired else
               (data.Nlvr2TripletDataset if train else data.Nlvr2TripletEvalDataset))
        return cls(txt_db, img_db, self._use_img_type, rank=rank, world_size=world_size,
                   seed=seed)

    def collate(self, train):
        if "paired" in self._variant:
            return data.nlvr2_paired_collate if train else data.nlvr2_paired_eval_collate
        return data.nlvr2_triplet_collate if train else data.nlvr2_triplet_eval_collate

    # ---------------------------------------------------------------- validation
    def predict(self, logits):
        return ["True" if i == 1 else "False" for i in logits.argmax(-1).tolist()]

    def batch_metrics(self, logits, b, sums):
        t = b["targets"]
        sums["loss"] += float(F.cross_entropy(logits, t, reduction="sum"))
        sums["correct"] += float((logits.argmax(-1) == t).sum())
        sums["n"] += t.size(0)

    def finish_metrics(self, tot, results, split):
        if tot["n"] == 0:
            return {}
        labelled = [(q, p, t) for q, p, t in results if t is not None]
        return {f"{split}/loss": tot["loss"] / tot["n"], f"{split}/acc": tot["correct"] / tot["n"],
                f"{split}/consistency": nlvr2_consistency(
                    [q for q, _, _ in labelled], [(p == "True") == bool(t) for _, p, t in labelled])}

    def write_results(self, out_dir, split, step, results):
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{split}_results_{step}_all.csv")
        atomic_write(path, _csv(results))
        return path

    # ---------------------------------------------------------------- inference
    def add_infer_args(self, parser):
        super().add_infer_args(parser)
        parser.add_argument("--model", default=None, choices=tuple(NLVR2_MODELS),
                            help="NLVR2 variant (default: the run's)")
        parser.add_argument("--use_img_type", default=None, action=argparse.BooleanOptionalAction,
                            help="image type embeddings (default: the run's setting)")

    def infer_config(self, cfg, args):
        if args.model is not None:
            cfg["model"] = args.model
        if args.use_img_type is not None:
            cfg["use_img_type"] = args.use_img_type

    def labelled_metrics(self, logits, targets, qids, preds, sums):
        correct = [(p == "True") == bool(y) for p, y in zip(preds, targets.tolist())]
        sums["labelled"].extend(zip(qids, correct))
        sums["score"] += sum(correct)

    def summary_metrics(self, sums):
        return {"acc": sums["score"] / sums["n"],
                "consistency": nlvr2_consistency([q for q, _ in sums["labelled"]],
                                                 [c for _, c in sums["labelled"]])}

    def write_predictions(self, path, results):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, _csv(results))

    # ---------------------------------------------------------------- predict
    predict_fields = {"statement": ("text", True, "NLVR2: the statement about the two images "
                                                  "(--image left --image right)")}
    predict_images = 2

    def add_predict_args(self, parser):
        super().add_predict_args(parser)
        parser.add_argument("--model", default=None, choices=tuple(NLVR2_MODELS),
                            help="NLVR2 variant (default: the run's)")
        parser.add_argument("--use_img_type", default=None, action=argparse.BooleanOptionalAction,
                            help="NLVR2: image type embeddings (default: the run's setting)")

    def _sides(self, request, ctx):
        """([CLS] statement [SEP], its words, [(img_feat, img_pos_feat, img_type_ids)] of the
        left and the right image) as the NLVR2 datasets build them."""
        row, words = ctx.text_row(request["statement"], request["where"], "statement")
        sides = []
        for side, img in enumerate(request["images"]):
            feat, pos = ctx.image_inputs(img)
            types = (torch.full((feat.size(0),), side + 1, dtype=torch.long)
                     if self._use_img_type else None)
            sides.append((feat, pos, types))
        return torch.tensor(row), words, sides

    def predict_item(self, request, ctx):
        input_ids, _, sides = self._sides(request, ctx)
        if "paired" in self._variant:
            inputs = [{"input_ids": input_ids, "img_feat": f, "img_pos_feat": p,
                       "attn_masks": torch.ones(len(input_ids) + f.size(0), dtype=torch.long),
                       "img_type_ids": t} for f, p, t in sides]
            return {"inputs": inputs, "targets": None, "qid": request["id"]}
        feat = torch.cat([f for f, _, _ in sides])
        return {"input_ids": input_ids, "img_feat": feat,
                "img_pos_feat": torch.cat([p for _, p, _ in sides]),
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long),
                "img_type_ids": (torch.cat([t for _, _, t in sides]) if self._use_img_type
                                 else None),
                "targets": None, "qid": request["id"]}

    def predict_answer(self, logits, ctx):
        """True/False by the softmax of the two logits (NLVR2 is trained with cross-entropy);
        the answer is the arg-max, as inference writes it."""
        top = ranked_labels(torch.softmax(logits, -1), {0: "False", 1: "True"}, 2, logits)
        return {"answer": top[0]["answer"], "score": top[0]["score"], "top": top}

    def predict_alignment(self, request, answer, ctx):
        _, words, _ = self._sides(request, ctx)
        batch = self.collate(False)([self.predict_item(request, ctx)])
        batch.pop("qids", None)
        regions = [[(i, r) for r in range(img.num_boxes)]
                   for i, img in enumerate(request["images"])]
        if "paired" not in self._variant:            # one row: both images' regions
            regions = [regions[0] + regions[1]]
        return batch, words, regions

    def predict_picture(self, request, answer):
        return {"title": [f"statement: {request['statement']}", f"-> {answer['answer']}"],
                "ranked": [(t["answer"], t["score"]) for t in answer["top"]], "highlight": []}

    # ---------------------------------------------------------------- preprocessing
    prepro_formats = {"nlvr2": "NLVR2's JSON-lines files (train.json, dev.json, test1.json)"}

    def add_prepro_args(self, parser):
        parser.add_argument("--missing_imgs", default=None,
                            help="NLVR2: a JSON list of image names (nlvr2_...-img0.npz) whose "
                                 "pairs are left out (the original's missing_nlvr2_imgs.json)")

    def prepro(self, files, fmt, args, ctx):
        """The original ``prepro.py``'s ``process_nlvr2``: each line's object as it is plus
        ``input_ids``, ``img_fname`` (the pair ``nlvr2_<identifier without its last part>
        -img0.npz`` / ``-img1.npz``: the image keys of ``<id>-img0.png`` with the prefix
        ``nlvr2_`` unless ``--img_prefix`` says otherwise) and ``target`` (1 for the label
        ``"True"``, 0 for ``"False"``, None without a label), keyed by ``identifier``."""
        path = getattr(args, "missing_imgs", None)
        missing = load_json(path, "--missing_imgs") if path else []
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise PreproError(f"--missing_imgs {path}: must be a JSON list of image names")
        return Prepared(self._prepro_examples(files, set(missing), ctx))

    def _prepro_examples(self, files, missing, ctx):
        for path in files:
            lines = read_jsonl(path, ctx.report)
            for where, ex in ctx.bar(lines, f"NLVR2 {os.path.basename(path)}"):
                if not require(ex, ("identifier", "sentence"), where, ctx.report,
                               {"identifier": str}):
                    continue
                id_ = ex["identifier"]
                img_id = "-".join(id_.split("-")[:-1])
                if not img_id:
                    ctx.bad(where, BAD_VALUE, f"identifier {id_!r} is not <split>-<set>-"
                            "<pair>-<sentence>")
                    continue
                names = [ctx.image_key(f"{img_id}-img{k}.png", where, "nlvr2_")
                         for k in (0, 1)]
                if None in names:
                    continue
                gone = [n for n in names if n in missing]
                if gone:
                    ctx.bad(where, MISSING_IMAGE, f"{gone[0]} is in --missing_imgs")
                    continue
                if not all(ctx.image(n, where) for n in names):
                    continue
                input_ids = ctx.tokens(ex["sentence"], where, "sentence")
                if input_ids is None:
                    continue
                if "label" in ex:
                    if ex["label"] not in ("True", "False"):
                        ctx.bad(where, BAD_VALUE, f"label {ex['label']!r} is neither 'True' "
                                "nor 'False'")
                        continue
                    target = 1 if ex["label"] == "True" else 0
                else:
                    target = None
                ex["input_ids"] = input_ids
                ex["img_fname"] = tuple(names)
                ex["target"] = target
                yield where, id_, ex
