"""Referring expressions (``train_re.py``, ``inf_re.py``).

:class:`~uniter_fast.data.re.ReDataset` on the ground-truth boxes,
``train_batch_size`` / ``val_batch_size`` expressions per batch, ``train_loss``
(``cls`` or ``rank``), ``margin``, ``hard_ratio``, ``mlp``; loss ``sum()``; validation
accuracy (IoU > 0.5) on ``val`` (and ``test``) with ground-truth or detected boxes
(``coco_gt`` in the image db's directory name, as the original; the original tested the
whole path, so a parent directory named ``...gt...`` turned a detected-box db into a
ground-truth one), predictions to ``results_{split}/results_{step}_all.json``
(``inf_re.py``'s records).  Inference writes
``results_{name}_{split}_on_{gt|det}_all.json`` (``{"sent_id", "pred_box", "tgt_box"}``)
and prints the accuracy.  Synthetic data: :mod:`uniter_fast.data.synthetic_tasks.re`.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

from ..constants import IMG_DIM
from ..data.db import open_img_db
from ..data.loader import TaskLoader, move_to_device
from ..data.re import (
    ReDataset,
    ReEvalDataset,
    ReTxtTokLmdb,
    re_collate,
    re_det_img_name,
    re_eval_collate,
    re_gt_img_name,
)
from ..data.sampler import ExampleSampler, config_seed, rank_seed
from ..data.synthetic_tasks import re as synthetic_re
from ..eval.re import re_accuracy, re_eval_batch
from ..files import atomic_write
from ..model.build import DEFAULT_MAX_TXT_LEN, model_config_path, set_dropout
from ..model.re import UniterForReferringExpressionComprehension, re_train_loss
from ..prepro import (
    BAD_VALUE,
    MISSING_FIELD,
    MISSING_IMAGE,
    UNKNOWN_REFERENCE,
    Prepared,
    PreproError,
    at_index,
    load_json,
    load_pickle,
    require,
)
from ..training.validation import reduce_sums, val_batches
from .base import (
    ORIGINAL_KEYS,
    OWN_KEYS,
    FinetuneTask,
    example_loader,
    gather_lists,
    is_gt_db,
    result_dir,
)
from .inference import (
    Progress,
    autocast,
    claim_outputs,
    db_name,
    default_output_dir,
    load_strict,
    load_weights,
    write_json,
)

#: the original train_re.py's keys beyond the shared ones
RE_KEYS = frozenset({"train_loss", "margin", "hard_ratio", "mlp", "decay"})
#: the ground-truth-box image dbs: ``coco_gt`` in the name, read with every box
GT_MARKER, GT_NUM_BB = "coco_gt", 100
#: expressions per batch at inference (inf_re.py's default)
DEFAULT_INFER_BATCH = 128
#: the box rule keys the RE image dbs are read without (conf_th = -1)
_BOX_RULE_KEYS = ("conf_th", "max_bb", "min_bb")


class _EpochMixin:
    """The loaders' ``set_epoch`` (the order comes from the sampler, seeded by
    (seed, epoch), so the datasets' own ``shuffle`` is not needed)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class _ReTrainDataset(_EpochMixin, ReDataset):
    pass


class _ReEvalDataset(_EpochMixin, ReEvalDataset):
    pass


def re_img_db(path: str, cfg):
    """An RE image db: ground-truth boxes (every box) or detected boxes (the box rule)."""
    if is_gt_db(path, GT_MARKER):
        return open_img_db(path, cfg, conf_th=-1, num_bb=GT_NUM_BB)
    return open_img_db(path, cfg)


class ReTask(FinetuneTask):
    name = "re"
    head_prefixes = ("re_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | RE_KEYS
    synthetic_data = synthetic_re
    infer_batch_help = f"expressions per batch (default {DEFAULT_INFER_BATCH})"

    def check_config(self, cfg):
        super().check_config(cfg)
        loss = cfg.get("train_loss", "cls")
        if loss not in ("cls", "rank"):
            raise ValueError(f"training config train_loss must be 'cls' or 'rank', got {loss!r}")

    def synthetic_world(self, cfg):
        # RE reads every image db with conf_th=-1: the synthetic world keeps its box rule
        return super().synthetic_world({k: v for k, v in cfg.items()
                                        if k not in _BOX_RULE_KEYS})

    def make_model(self, cfg, state=None):
        model = UniterForReferringExpressionComprehension.from_pretrained(
            model_config_path(cfg), state, img_dim=int(cfg.get("img_dim") or IMG_DIM),
            loss=cfg.get("train_loss", "cls"), margin=float(cfg.get("margin", 0.2)),
            hard_ratio=float(cfg.get("hard_ratio", 0.3)), mlp=int(cfg.get("mlp", 1)))
        set_dropout(model, cfg.get("dropout"))
        return model

    # ---------------------------------------------------------------- data
    def train_loader(self, cfg, rank, world_size, accum_steps):
        max_len = int(cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN))
        parts = [_ReTrainDataset(ReTxtTokLmdb(t, max_len), re_img_db(i, cfg), rank=rank,
                                 world_size=world_size, seed=config_seed(cfg))
                 for t, i in zip(cfg["train_txt_dbs"], cfg["train_img_dbs"])]
        sampler = ExampleSampler(int(cfg["train_batch_size"]), droplast=False,
                                 seed=rank_seed(cfg, rank))
        return example_loader(self.name, cfg, parts, re_collate, sampler, accum_steps)

    def val_loaders(self, cfg, rank, world_size):
        out = {}
        for split in self.splits(cfg):
            path = cfg[f"{split}_img_db"]
            ds = _ReEvalDataset(ReTxtTokLmdb(cfg[f"{split}_txt_db"], -1), re_img_db(path, cfg),
                                use_gt_feat=is_gt_db(path, GT_MARKER), rank=rank,
                                world_size=world_size)
            bs = int(cfg.get("val_batch_size") or cfg["train_batch_size"])
            out[split] = TaskLoader(ds, re_eval_collate, ExampleSampler(bs, shuffle=False))
        return out

    # ---------------------------------------------------------------- training
    def compute_loss(self, engine, name, batch, cfg):
        return re_train_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["input_ids"].size(0))

    def validate(self, engine, val_loaders, ctx):
        logs: Dict[str, float] = {}
        for split, loader in val_loaders.items():
            correct, n, preds = 0, 0, []
            for b, real in val_batches(loader, ctx):
                scores = engine(b, compute_loss=False)
                if not real:
                    continue
                c, p = re_eval_batch(scores, b)
                correct, n, preds = correct + c, n + len(p), preds + p
            tot = reduce_sums({"correct": correct, "n": n}, ("correct", "n"), ctx.world_size)
            preds = gather_lists(preds, ctx.world_size)
            logs[f"{split}/acc"] = re_accuracy(int(tot["correct"]), int(tot["n"]))
            if ctx.rank == 0:
                atomic_write(os.path.join(result_dir(ctx, split),
                                          f"results_{ctx.step}_all.json"), json.dumps(preds))
        return logs

    # ---------------------------------------------------------------- inference
    def add_infer_args(self, parser):
        parser.add_argument("--output_dir", default=None,
                            help="where the result files go (default: RUN_DIR/results_re_<txt db>)")

    def infer(self, args, cfg, source, device):
        out_dir = args.output_dir or default_output_dir(
            source, f"results_{self.name}_{db_name(args.txt_db)}")
        gt = is_gt_db(args.img_db, GT_MARKER)
        split = os.path.basename(os.path.normpath(args.txt_db)).split("_")[-1].split(".")[0]
        boxes = "gt" if gt else "det"
        path = os.path.join(out_dir, f"results_{source.name}_{split}_on_{boxes}_all.json")
        claim_outputs([path], args.overwrite)
        model = load_strict(self.blank_model(cfg), load_weights(source), source.where, cfg)
        model.to(device).eval()
        ds = _ReEvalDataset(ReTxtTokLmdb(args.txt_db, -1), re_img_db(args.img_db, cfg),
                            use_gt_feat=gt)
        loader = TaskLoader(ds, re_eval_collate,
                            ExampleSampler(int(args.batch_size or DEFAULT_INFER_BATCH),
                                           shuffle=False))
        correct, preds = 0, []
        bar = Progress(len(ds), not args.no_progress, "sent")
        with torch.no_grad(), autocast(device, args.precision):
            for b in loader.epoch_batches(0):
                b = move_to_device(b, device)
                c, p = re_eval_batch(model(b, compute_loss=False), b)
                correct, preds = correct + c, preds + p
                bar(len(p))
        bar.close()
        write_json(path, preds)
        acc = re_accuracy(correct, len(preds))
        print(f"{split}-acc({boxes}): {acc * 100:.2f}%")
        return {"metrics": {"acc": acc}, "output": path}

    # ---------------------------------------------------------------- predict
    predict_fields = {"text": ("text", True, "RE: the referring expression")}

    def _predict_item(self, request, ctx):
        """The eval dataset's item of a request on its image's detected regions."""
        row, words = ctx.text_row(request["text"], request["where"], "text")
        feat, pos = ctx.image_inputs(request["images"][0])
        input_ids = torch.tensor(row)
        n = feat.size(0)
        return {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + n, dtype=torch.long),
                "obj_masks": torch.zeros(n, dtype=torch.uint8)}, words

    def predict_requests(self, model, requests, ctx):
        """Each region's score as inference computes it (``re_collate`` batches); the answer
        is the arg-max region's box [x, y, w, h] in pixels (``inf_re.py``'s ``pred_box``),
        ``score`` its softmax over the regions (``train_loss`` cls; sigmoid for rank)."""
        items = [self._predict_item(r, ctx)[0] for r in requests]
        rank = getattr(model, "loss", "cls") == "rank"
        out = []
        for st, chunk in zip(range(0, len(items), ctx.batch_size), ctx.chunks(items)):
            scores = ctx.run(model, re_collate(list(chunk)))
            for k, row in enumerate(scores):
                img = requests[st + k]["images"][0]
                logits = row[:img.num_boxes]
                probs = torch.sigmoid(logits) if rank else torch.softmax(logits, -1)
                boxes = img.boxes_xywh()
                order = probs.topk(min(ctx.top_k, img.num_boxes)).indices.tolist()
                best = int(logits.argmax())
                top = [{"region": r, "box": boxes[r].tolist(), "score": float(probs[r]),
                        "logit": float(logits[r])} for r in order]
                out.append({"answer": boxes[best].tolist(), "region": best,
                            "score": float(probs[best]), "logit": float(logits[best]),
                            "top": top})
        return out

    def predict_alignment(self, request, answer, ctx):
        item, words = self._predict_item(request, ctx)
        n = request["images"][0].num_boxes
        return re_collate([item]), words, [[(0, r) for r in range(n)]]

    def predict_picture(self, request, answer):
        top = answer["top"]
        return {"title": [f"expression: {request['text']}",
                          f"-> region {answer['region']} (x, y, w, h = "
                          f"{', '.join(f'{v:.0f}' for v in answer['answer'])})"],
                "ranked": [(f"region {t['region']}", t["score"]) for t in top],
                "highlight": [(0, t["region"], f"{t['region']}: {t['score']:.2f}")
                              for t in top[:3]]}

    # ---------------------------------------------------------------- preprocessing
    prepro_formats = {"refer": "refer's refs(DATASET).p, instances.json and the "
                               "iid_to_ann_ids.json of the ground-truth image db, in this "
                               "order (the original prepro.py's three --annotations)"}

    def add_prepro_args(self, parser):
        parser.add_argument("--split", default=None,
                            help="RE: the refs' split to write (train, val, testA, ...; "
                                 "default: from --out's name as the original: "
                                 "refcoco_testA.db -> testA)")

    def prepro(self, files, fmt, args, ctx):
        """The original ``prepro.py``'s ``process_referring_expressions``: one record per
        sentence of the split's refs (``sent_id``, ``sent``, ``ref_id``, ``ann_id``,
        ``image_id``, ``bbox`` of the referred annotation, ``input_ids``, ``img_fname``),
        keyed by sentence id, and ``images.json`` (with each image's ``ann_ids`` in the
        ground-truth image db's box order, from ``iid_to_ann_ids.json``),
        ``annotations.json``, ``categories.json``, ``refs.json`` of the split.  With
        ``--img_db``, each image must be in it and, in a ground-truth db (``coco_gt`` in its
        name), have one box per entry of its ``ann_ids`` (as the training dataset
        requires)."""
        if len(files) != 3:
            raise PreproError(f"RE takes 3 --annotations (refs(DATASET).p, instances.json, "
                              f"iid_to_ann_ids.json), got {len(files)}")
        split = getattr(args, "split", None) or _split_of(getattr(args, "out", ""))
        refs = load_pickle(files[0], "refs pickle")
        instances = load_json(files[1], "instances")
        iid = load_json(files[2], "iid_to_ann_ids")
        if not isinstance(refs, list):
            raise PreproError(f"refs pickle {files[0]}: a {type(refs).__name__}, not a list "
                              "of refs")
        if not isinstance(instances, dict) or not all(
                isinstance(instances.get(k), list)
                for k in ("images", "annotations", "categories")):
            raise PreproError(f"instances {files[1]}: not COCO instances (images, "
                              "annotations, categories lists)")
        if not isinstance(iid, dict) or not isinstance(iid.get("iid_to_ann_ids"), dict):
            raise PreproError(f"iid_to_ann_ids {files[2]}: lacks the 'iid_to_ann_ids' "
                              "object (image id -> ann ids)")
        iid = iid["iid_to_ann_ids"]
        ok_refs = []
        for i, ref in enumerate(refs):
            where = at_index(files[0], None, i)
            if not isinstance(ref, dict):
                ctx.bad(where, BAD_VALUE, f"a {type(ref).__name__}, not a ref")
            elif require(ref, ("ref_id", "ann_id", "image_id", "split", "sentences",
                               "sent_ids"), where, ctx.report,
                         {"sentences": list, "sent_ids": list, "image_id": (int, str),
                          "ann_id": (int, str), "split": str}):
                ok_refs.append((where, ref))
        in_split = [(w, r) for w, r in ok_refs if r["split"] == split]
        if not in_split:
            have = sorted({str(r["split"]) for _, r in ok_refs})
            raise PreproError(f"refs pickle {files[0]}: no ref of split {split!r} (it has "
                              f"{have})")
        image_set = {r["image_id"] for _, r in in_split}
        images, ann_ids_of = [], {}
        for j, img in enumerate(instances["images"]):
            if not isinstance(img, dict) or img.get("id") not in image_set:
                continue
            where = at_index(files[1], "images", j)
            if not require(img, ("file_name", "height", "width"), where, ctx.report):
                continue
            ids = iid.get(str(img["id"]))
            if not isinstance(ids, list):
                ctx.bad(where, MISSING_FIELD, f"image {img['id']} has no ann ids in "
                        f"{files[2]}", "left out with its sentences")
                continue
            images.append({"id": img["id"], "file_name": img["file_name"], "ann_ids": ids,
                           "height": img["height"], "width": img["width"]})
            ann_ids_of[img["id"]] = ids
        annotations = []
        for j, ann in enumerate(instances["annotations"]):
            if not isinstance(ann, dict) or ann.get("image_id") not in image_set:
                continue
            if require(ann, ("id", "area", "bbox", "category_id", "iscrowd"),
                       at_index(files[1], "annotations", j), ctx.report):
                annotations.append({"id": ann["id"], "area": ann["area"], "bbox": ann["bbox"],
                                    "image_id": ann["image_id"],
                                    "category_id": ann["category_id"],
                                    "iscrowd": ann["iscrowd"]})
        files_out = {"images.json": images, "annotations.json": annotations,
                     "categories.json": instances["categories"],
                     "refs.json": [r for _, r in in_split]}
        return Prepared(self._prepro_examples(in_split, ann_ids_of, annotations, ctx),
                        files=files_out, meta={"split": split})

    def _prepro_examples(self, refs, ann_ids_of, annotations, ctx):
        anns = {a["id"]: a for a in annotations}
        gt_db = ctx.images is not None and is_gt_db(ctx.images.img_dir, GT_MARKER)
        checked = {}
        for where, ref in ctx.bar(refs, "referring expressions", total=len(refs), unit="ref"):
            image_id, ann_id = ref["image_id"], ref["ann_id"]
            problem = None
            if image_id not in ann_ids_of:
                problem = (UNKNOWN_REFERENCE, f"image {image_id!r} is not in images.json")
            elif ann_id not in anns:
                problem = (UNKNOWN_REFERENCE, f"ann_id {ann_id!r} is not an annotation of "
                           f"image {image_id!r} in instances.json")
            elif ann_id not in ann_ids_of[image_id]:
                problem = (UNKNOWN_REFERENCE, f"ann_id {ann_id!r} is not among image "
                           f"{image_id!r}'s ann_ids (iid_to_ann_ids.json)")
            elif ctx.images is not None:
                if image_id not in checked:
                    checked[image_id] = self._check_image(image_id, ann_ids_of[image_id],
                                                          gt_db, ctx)
                problem = checked[image_id]
            for k, sent in enumerate(ref["sentences"]):
                at = f"{where}.sentences[{k}]"
                if problem is not None:
                    ctx.bad(at, *problem)
                    continue
                if not isinstance(sent, dict):
                    ctx.bad(at, BAD_VALUE, f"a {type(sent).__name__}, not a sentence")
                    continue
                if not require(sent, ("sent_id", "sent"), at, ctx.report):
                    continue
                input_ids = ctx.tokens(sent["sent"], at, "sent")
                if input_ids is None:
                    continue
                yield at, str(sent["sent_id"]), {
                    "sent_id": sent["sent_id"], "sent": sent["sent"], "ref_id": ref["ref_id"],
                    "ann_id": ann_id, "image_id": image_id, "bbox": anns[ann_id]["bbox"],
                    "input_ids": input_ids, "img_fname": re_gt_img_name(image_id)}

    @staticmethod
    def _check_image(image_id, ann_ids, gt_db, ctx):
        """(reason, detail) when the image db cannot serve ``image_id``, else None."""
        try:
            key = re_gt_img_name(image_id) if gt_db else re_det_img_name(image_id)
        except (TypeError, ValueError):
            return BAD_VALUE, f"image_id {image_id!r} is not a number"
        if key not in ctx.images:
            return MISSING_IMAGE, f"{key} is not in the image db {ctx.images.img_dir}"
        if gt_db:
            n = ctx.images.boxes(key)
            if n != len(ann_ids):
                return BAD_VALUE, (f"the image db has {n} boxes for {key}, its ann_ids "
                                   f"(iid_to_ann_ids.json) {len(ann_ids)}")
        return None


def _split_of(out: str) -> str:
    """The split in a text db's name as the original took it: ``refcoco_testA.db`` ->
    ``testA``."""
    parts = os.path.basename(os.path.normpath(out or ".")).split(".")[0].split("_")
    if len(parts) < 2 or not parts[1]:
        raise PreproError(f"--out {out}: no split in the name (the original reads it from "
                          "<dataset>_<split>.db); give --split")
    return parts[1]
