"""Image-text retrieval: ``itm`` (``train_itm.py``, ``inf_itm.py``) and its hard-negative
variant ``itm-hn`` (``train_itm_hard_negatives.py``).

* ``itm``: :class:`~uniter_fast.data.itm.ItmRankDataset` with ``negative_size`` negatives
  each way, ``train_batch_size`` *captions* per batch (a plain DataLoader batch in the
  original, not tokens), the triplet loss with ``margin``, reduced by ``loss.mean()``; the
  rank head starts from the ITM head's "match" row (``init_output``) unless the
  checkpoint has ``rank_output.weight/bias``.
* ``itm-hn``: per caption (and per image) one batch of the positive and
  ``negative_size`` sampled negatives; the ``hard_neg_size`` hardest are re-run with
  gradient.  The original accumulates ``train_batch_size`` captions and images into one
  optimizer step, each direction's loss ``mean() / train_batch_size``; here the DeepSpeed
  ``gradient_accumulation_steps`` is set to ``train_batch_size`` and a micro-step's loss
  is ``mean(text side) + mean(image side)`` (DeepSpeed divides by the accumulation
  steps: the same gradient).
* Validation of both: the full ranking of every ``val`` (and ``test``) caption against
  every image with the fast scorer (:func:`~uniter_fast.eval.itr.itm_dataset_scores`),
  the score matrix gathered over ranks, :func:`~uniter_fast.eval.itr.itm_eval`:
  ``{split}/txt_r1`` ... ``{split}/r_mean`` (the original's ``full_val``, always on here:
  the fast scorer makes it cheap; ``inf_max_tokens``, default 16384, sets its batch),
  written to ``results_{split}/scores_{step}.json``.
* Inference (both): the full score matrix with the fast scorer (image/text embeddings
  once, pairs batched by joint length; progress bar with pairs/s and ETA),
  ``scores.json`` (the recalls), ``results.bin`` (pickled ``(score_matrix, txt_ids,
  img_ids)``, as the original) and ``config.json`` (the options) in ``--output_dir``.  A
  *pretraining* checkpoint works too (zero-shot retrieval: the ITM head's "match" logit
  scores the pairs).  The checkpoint's own ``rank_output`` is used when it has one (the
  original's ``inf_itm.py`` tested ``'rank_output' not in checkpoint`` against keys named
  ``rank_output.weight/bias`` and so always replaced a fine-tuned head by the ITM row).

Synthetic data (both): :mod:`uniter_fast.data.synthetic_tasks.itm`.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from typing import Dict

import torch

from ..constants import IMG_DIM, IMG_LABEL_DIM
from ..data.db import TxtTokLmdb, open_img_db
from ..data.itm import (
    ItmEvalDataset,
    ItmRankDataset,
    ItmRankDatasetHardNegFromImage,
    ItmRankDatasetHardNegFromText,
    itm_rank_collate,
    itm_rank_hn_collate,
)
from ..data.loader import ConcatDatasetWithLens, MetaLoader, TaskLoader
from ..data.sampler import ExampleSampler, config_seed, rank_seed
from ..data.synthetic_tasks import itm as synthetic_itm
from ..eval.itr import gather_score_matrix, itm_dataset_scores, itm_eval, itr_score_matrix
from ..files import atomic_write
from ..model import itm as models
from ..model.build import DEFAULT_MAX_TXT_LEN, load_model_config, model_config_path, set_dropout
from ..model.pretrain import UniterForPretraining
from ..prepro import (
    BAD_VALUE,
    UNKNOWN_REFERENCE,
    Prepared,
    PreproError,
    at_index,
    read_annotation,
    records,
    require,
)
from .base import (
    ORIGINAL_KEYS,
    OWN_KEYS,
    FinetuneTask,
    example_loader,
    full_params,
    result_dir,
)
from .inference import (
    Progress,
    amp_dtype,
    claim_outputs,
    db_name,
    default_output_dir,
    is_pretraining_state,
    load_strict,
    load_weights_filled,
    write_json,
)

#: the originals' keys (train_itm.py) and this trainer's ``inf_max_tokens`` (tokens per
#: batch of the fast retrieval scorer)
ITM_KEYS = frozenset({"negative_size", "inf_minibatch_size", "margin", "full_val",
                      "inf_max_tokens"})
#: train_itm_hard_negatives.py adds ``hard_neg_size``
ITM_HN_KEYS = ITM_KEYS | {"hard_neg_size"}
#: the fast scorer's batch (tokens) at validation and inference
DEFAULT_SCORER_TOKENS = 16384
#: the original's ``inf_minibatch_size``
DEFAULT_MINIBATCH = 400
#: the originals' argparse defaults of ``margin`` and ``hard_neg_size``
DEFAULT_MARGIN, DEFAULT_HARD_NEG_SIZE = 0.2, 16


class ItmTask(FinetuneTask):
    """Image-text retrieval with sampled negatives."""

    name = "itm"
    head_prefixes = ("rank_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | ITM_KEYS
    synthetic_data = synthetic_itm
    infer_batch_help = f"tokens per scorer batch (default {DEFAULT_SCORER_TOKENS})"

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        self.neg_size = int(cfg.get("negative_size", 1))
        if self.neg_size < 1:
            raise ValueError(f"training config negative_size must be >= 1, got "
                             f"{cfg['negative_size']}")
        self.margin = float(cfg.get("margin", DEFAULT_MARGIN))

    def make_model(self, cfg, state=None):
        model = models.UniterForImageTextRetrieval.from_pretrained(
            model_config_path(cfg), state, img_dim=int(cfg.get("img_dim") or IMG_DIM),
            margin=float(cfg.get("margin", DEFAULT_MARGIN)))
        return self._finish_model(model, cfg, state)

    @staticmethod
    def _finish_model(model, cfg, state):
        if state is not None and not models.has_rank_output(state, model):
            model.init_output()       # the original's intent (its key test always failed)
        set_dropout(model, cfg.get("dropout"))
        return model

    # ---------------------------------------------------------------- data
    def _train_dbs(self, cfg):
        max_len = int(cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN))
        return [(TxtTokLmdb(t, max_len), open_img_db(i, cfg))
                for t, i in zip(cfg["train_txt_dbs"], cfg["train_img_dbs"])]

    def train_loader(self, cfg, rank, world_size, accum_steps):
        parts = [ItmRankDataset(t, i, self.neg_size, rank=rank, world_size=world_size,
                                seed=config_seed(cfg)) for t, i in self._train_dbs(cfg)]
        sampler = ExampleSampler(int(cfg["train_batch_size"]), droplast=True,
                                 seed=rank_seed(cfg, rank))
        return example_loader(self.name, cfg, parts, itm_rank_collate, sampler, accum_steps)

    def val_loaders(self, cfg, rank, world_size):
        out = {}
        for split in self.splits(cfg):
            txt = TxtTokLmdb(cfg[f"{split}_txt_db"], -1)
            img = open_img_db(cfg[f"{split}_img_db"], cfg)
            n_img = len(set(txt.txt2img[i] for i in txt.id2len))
            mini = min(int(cfg.get("inf_minibatch_size", DEFAULT_MINIBATCH)), n_img)
            out[split] = ItmEvalDataset(txt, img, mini, rank=rank, world_size=world_size)
        return out

    # ---------------------------------------------------------------- training
    def compute_loss(self, engine, name, batch, cfg):
        return models.itm_rank_train_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["attn_masks"].size(0)
                                                   // batch["sample_size"])

    def validate(self, engine, val_loaders, ctx):
        logs: Dict[str, float] = {}
        max_tok = int(ctx.cfg.get("inf_max_tokens", DEFAULT_SCORER_TOKENS))
        for split, ds in val_loaders.items():
            with full_params(engine, ctx):
                scores = itm_dataset_scores(engine.module, ds, max_tokens=max_tok)
            scores, txt_ids = gather_score_matrix(scores, ds.ids)
            res = itm_eval(scores.float(), txt_ids, ds.all_img_ids, ds.txt_db.txt2img,
                           ds.img2txts)
            logs.update({f"{split}/{k}": v for k, v in res.items()})
            if ctx.rank == 0:
                atomic_write(os.path.join(result_dir(ctx, split), f"scores_{ctx.step}.json"),
                             json.dumps(res))
        return logs

    # ---------------------------------------------------------------- inference
    def add_infer_args(self, parser):
        parser.add_argument("--output_dir", default=None,
                            help="where the result files go (default: RUN_DIR/results_itm_<txt db>)")

    def _infer_model(self, cfg, source):
        """(model, zero_shot): a retrieval model, or a pretraining one (zero-shot)."""
        config = load_model_config(cfg)
        img_dim = int(cfg.get("img_dim") or IMG_DIM)
        sd = load_weights_filled(source)    # a pretraining model needs its tied weights too
        if is_pretraining_state(sd):
            heads = [v for k, v in sd.items() if k.startswith("region_classifier.net.")
                     and k.endswith(".weight") and v.dim() == 2]
            label_dim = int(heads[-1].size(0)) if heads else int(cfg.get("img_label_dim")
                                                                or IMG_LABEL_DIM)
            return UniterForPretraining.from_pretrained(config, sd, img_dim=img_dim,
                                                        img_label_dim=label_dim), True
        model = models.UniterForImageTextRetrieval(config, img_dim)
        if not models.has_rank_output(sd, model):
            raise ValueError(f"checkpoint {source.where} has no rank_output.weight/bias and is "
                             "not a pretraining checkpoint")
        return load_strict(model, sd, source.where), False

    def infer(self, args, cfg, source, device):
        out_dir = args.output_dir or default_output_dir(
            source, f"results_{ItmTask.name}_{db_name(args.txt_db)}")
        files = {k: os.path.join(out_dir, k) for k in ("config.json", "results.bin",
                                                        "scores.json")}
        claim_outputs(list(files.values()), args.overwrite)
        model, zero_shot = self._infer_model(cfg, source)
        model.to(device).eval()
        txt = TxtTokLmdb(args.txt_db, -1)
        img = open_img_db(args.img_db, cfg)
        n_img = len(set(txt.txt2img[i] for i in txt.id2len))
        ds = ItmEvalDataset(txt, img, min(DEFAULT_MINIBATCH, n_img))
        total = len(ds.ids) * len(ds.all_img_ids)
        bar = Progress(total, not args.no_progress)
        t0 = time.time()
        try:
            scores = itm_dataset_scores(model, ds,
                                        max_tokens=int(args.batch_size or DEFAULT_SCORER_TOKENS),
                                        amp_dtype=amp_dtype(args.precision), progress=bar)
            if device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            bar.close()
        wall = time.time() - t0
        res = itm_eval(scores.float(), ds.ids, ds.all_img_ids, txt.txt2img, ds.img2txts)
        write_json(files["config.json"], vars(args))
        # the original's results.bin: pickled (score matrix, text ids, image ids)
        atomic_write(files["results.bin"],
                     pickle.dumps((scores.cpu(), list(ds.ids), list(ds.all_img_ids))))
        write_json(files["scores.json"], res)
        print("\n".join(f"{'image' if k.startswith('img') else 'text'} retrieval "
                        f"R{k.split('_r')[1]}: {v * 100:.2f}" for k, v in res.items()
                        if k[-1].isdigit()))
        return {"metrics": res, "pairs": total, "pairs_per_s": total / max(wall, 1e-9),
                "wall_s": wall, "output_dir": out_dir, "zero_shot": zero_shot}

    # ---------------------------------------------------------------- predict
    predict_fields = {"text": ("texts", True, "retrieval: a text to score against the image "
                                              "(repeat the option for several: they are "
                                              "ranked)")}

    def predict_model(self, args, cfg, source):
        return self._infer_model(cfg, source)[0]   # a pretraining checkpoint: zero-shot

    def predict_requests(self, model, requests, ctx):
        """Every text of a request scored against its image with inference's scorer
        (:func:`~uniter_fast.eval.itr.itr_score_matrix`, the same scores as ``infer``'s
        score matrix), ranked; requests on the same image scored together."""
        rows = [[torch.tensor(ctx.text_row(t, r["where"], "text")[0]) for t in r["text"]]
                for r in requests]
        groups: Dict[str, list] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["images"][0].digest, []).append(i)
        scores: Dict[int, list] = {}
        for idx in groups.values():
            texts = [t for i in idx for t in rows[i]]
            col = itr_score_matrix(model, texts, [requests[idx[0]]["images"][0].inputs()],
                                   max_tokens=DEFAULT_SCORER_TOKENS,
                                   amp_dtype=ctx.amp_dtype)[:, 0].float().cpu().tolist()
            for i in idx:
                scores[i], col = col[:len(rows[i])], col[len(rows[i]):]
        out = []
        for i, r in enumerate(requests):
            order = sorted(range(len(r["text"])), key=lambda k: -scores[i][k])
            top = [{"text": r["text"][k], "index": k, "score": scores[i][k]} for k in order]
            out.append({"answer": top[0]["text"], "score": top[0]["score"],
                        "scores": scores[i], "top": top})
        return out

    def predict_alignment(self, request, answer, ctx):
        """The best-ranked text and the image."""
        text = answer["top"][0]["text"]
        row, words = ctx.text_row(text, request["where"], "text")
        img = request["images"][0]
        feat, pos = img.inputs()
        input_ids = torch.tensor(row)
        pair = {"input_ids": input_ids, "img_feat": feat, "img_pos_feat": pos,
                "attn_masks": torch.ones(len(input_ids) + feat.size(0), dtype=torch.long)}
        return itm_rank_collate([[pair]]), words, [[(0, r) for r in range(img.num_boxes)]]

    def predict_picture(self, request, answer):
        return {"title": ["texts ranked by the retrieval score"],
                "ranked": [(t["text"], t["score"]) for t in answer["top"]], "highlight": []}

    # ---------------------------------------------------------------- preprocessing
    prepro_formats = {
        "coco": "COCO captions JSON (captions_train2014.json: images with file_name, "
                "annotations with id, image_id, caption)",
        "jsonl": "JSON lines {image, caption, id (optional)}"}

    def prepro(self, files, fmt, args, ctx):
        """Retrieval (and pretraining) records, one per caption: a COCO caption's ``id``,
        ``image_id`` and ``caption``, or a JSON line's fields as they are, plus
        ``input_ids`` and ``img_fname`` (the key of the image file); keyed by the
        caption's ``id`` (JSON lines without one: their number, from 0, over all the
        files' records)."""
        return Prepared(self._prepro_examples(files, fmt, ctx))

    def _prepro_examples(self, files, fmt, ctx):
        n = 0
        for path in files:
            kind, doc = ("jsonl", None) if fmt == "jsonl" else read_annotation(path)
            coco = isinstance(doc, dict) and "annotations" in doc
            if fmt == "coco" and not coco:
                raise PreproError(f"{path}: not a COCO captions JSON (no 'annotations')")
            items = (self._coco_captions(path, doc, ctx) if coco else
                     self._caption_lines(path, kind, doc, ctx))
            for where, id_, rec in ctx.bar(items, f"captions {os.path.basename(path)}"):
                id_ = str(n) if id_ is None else str(id_)     # JSON lines without ids
                n += 1
                key = ctx.image_key(rec.pop("_image"), where)
                if key is None or not ctx.image(key, where):
                    continue
                input_ids = ctx.tokens(rec["caption"], where, "caption")
                if input_ids is None:
                    continue
                rec["input_ids"], rec["img_fname"] = input_ids, key
                yield where, id_, rec

    @staticmethod
    def _coco_captions(path, doc, ctx):
        images, anns = doc.get("images"), doc["annotations"]
        if not isinstance(images, list) or not isinstance(anns, list):
            raise PreproError(f"{path}: 'images' and 'annotations' must be lists")
        files = {}
        for i, img in enumerate(images):
            where = at_index(path, "images", i)
            if not isinstance(img, dict):
                ctx.bad(where, BAD_VALUE, "not an object", "left out")
            elif require(img, ("id", "file_name"), where, ctx.report,
                         {"id": (int, str), "file_name": str}):
                files[img["id"]] = img["file_name"]
        for i, ann in enumerate(anns):
            where = at_index(path, "annotations", i)
            if not isinstance(ann, dict):
                ctx.bad(where, BAD_VALUE, "not an object")
                continue
            if not require(ann, ("id", "image_id", "caption"), where, ctx.report,
                           {"id": (int, str), "image_id": (int, str)}):
                continue
            if ann["image_id"] not in files:
                ctx.bad(where, UNKNOWN_REFERENCE, f"image_id {ann['image_id']!r} is not in "
                        "'images'")
                continue
            yield where, ann["id"], {"id": ann["id"], "image_id": ann["image_id"],
                                     "caption": ann["caption"],
                                     "_image": files[ann["image_id"]]}

    @staticmethod
    def _caption_lines(path, kind, doc, ctx):
        for where, ex in records(path, ctx.report, kind, doc):
            if require(ex, ("image", "caption"), where, ctx.report, {"image": str}):
                yield where, ex.get("id"), dict(ex, _image=ex["image"])


class _PairLoader:
    """Yields ``(name, {"t": text-side batch, "i": image-side batch})`` from two loaders."""

    def __init__(self, name: str, t: MetaLoader, i: MetaLoader):
        self.name, self.t, self.i = name, t, i

    def next(self):
        return self.name, {"t": self.t.next()[1], "i": self.i.next()[1]}

    def state_dict(self):
        return {"t": self.t.state_dict(), "i": self.i.state_dict()}

    def load_state_dict(self, state):
        self.t.load_state_dict(state["t"])
        self.i.load_state_dict(state["i"])


class ItmHnTask(ItmTask):
    """Image-text retrieval with hard negatives: the retrieval task with another sampler,
    loss and model (validation and inference are retrieval's)."""

    name = "itm-hn"
    known_keys = ORIGINAL_KEYS | OWN_KEYS | ITM_HN_KEYS

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        self.hard_size = int(cfg.get("hard_neg_size", DEFAULT_HARD_NEG_SIZE))
        if not 1 <= self.hard_size <= self.neg_size:
            raise ValueError(f"training config hard_neg_size must be in [1, negative_size="
                             f"{self.neg_size}], got {self.hard_size}")
        accum = int(cfg["train_batch_size"])
        if accum < 1:
            raise ValueError(f"training config train_batch_size must be >= 1, got {accum}")
        # the original accumulates train_batch_size texts and images per optimizer step
        ds_config["gradient_accumulation_steps"] = accum

    def make_model(self, cfg, state=None):
        model = models.UniterForImageTextRetrievalHardNeg.from_pretrained(
            model_config_path(cfg), state, img_dim=int(cfg.get("img_dim") or IMG_DIM),
            margin=float(cfg.get("margin", DEFAULT_MARGIN)), hard_size=int(cfg.get("hard_neg_size", DEFAULT_HARD_NEG_SIZE)))
        return self._finish_model(model, cfg, state)

    def train_loader(self, cfg, rank, world_size, accum_steps):
        dbs = self._train_dbs(cfg)
        loaders = []
        for k, cls in enumerate((ItmRankDatasetHardNegFromText, ItmRankDatasetHardNegFromImage)):
            parts = [cls(t, i, self.neg_size, rank=rank, world_size=world_size,
                         seed=config_seed(cfg)) for t, i in dbs]
            ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)
            sampler = ExampleSampler(1, droplast=True, seed=rank_seed(cfg, rank) + k)
            tl = TaskLoader(ds, itm_rank_hn_collate, sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
            loaders.append(MetaLoader({self.name: (tl, 1)}, accum_steps=1,
                                      seed=config_seed(cfg)))
        return _PairLoader(self.name, *loaders)

    def compute_loss(self, engine, name, batch, cfg):
        # the original's per-direction loss.mean() / train_batch_size: DeepSpeed divides
        # by gradient_accumulation_steps = train_batch_size
        lt = engine(batch["t"], sample_from="t", compute_loss=True).mean()
        li = engine(batch["i"], sample_from="i", compute_loss=True).mean()
        return lt + li, {"loss_t": float(lt.detach()), "loss_i": float(li.detach())}

    def check_batch(self, name, batch):
        for side in ("t", "i"):
            super().check_batch(name, batch[side])

    def batch_size(self, batch):
        return (int(batch["t"]["attn_masks"].sum() + batch["i"]["attn_masks"].sum()), 2)
