"""Fine-tuning part 2: image-text retrieval (``itm``, ``itm-hn``), referring expressions
(``re``) and VCR (``vcr``) as :class:`~uniter_fast.training.finetune.FinetuneTask`\\ s.

Configs are the original UNITER's (``config/train-itm-flickr-base-8gpu.json``,
``train-itm-coco-base-16gpu-hn.json``, ``train-refcoco-base-1gpu.json``,
``train-vcr-base-4gpu.json``) unchanged but for paths.  What each task does as the
original script does:

* ``itm`` (``train_itm.py``): :class:`~uniter_fast.data.itm.ItmRankDataset` with
  ``negative_size`` negatives each way, ``train_batch_size`` *captions* per batch (a
  plain DataLoader batch in the original, not tokens), the triplet loss with ``margin``,
  reduced by ``loss.mean()``; the rank head starts from the ITM head's "match" row
  (``init_output``) unless the checkpoint has ``rank_output.weight/bias``.
* ``itm-hn`` (``train_itm_hard_negatives.py``): per caption (and per image) one batch of
  the positive and ``negative_size`` sampled negatives; the ``hard_neg_size`` hardest are
  re-run with gradient.  The original accumulates ``train_batch_size`` captions and
  images into one optimizer step, each direction's loss ``mean() / train_batch_size``;
  here the DeepSpeed ``gradient_accumulation_steps`` is set to ``train_batch_size`` and a
  micro-step's loss is ``mean(text side) + mean(image side)`` (DeepSpeed divides by the
  accumulation steps: the same gradient).
* Validation of both: the full ranking of every ``val`` (and ``test``) caption against
  every image with the fast scorer (:func:`~uniter_fast.eval.itr.itm_dataset_scores`),
  the score matrix gathered over ranks, :func:`~uniter_fast.eval.itr.itm_eval`:
  ``{split}/txt_r1`` ... ``{split}/r_mean`` (the original's ``full_val``, always on here:
  the fast scorer makes it cheap; ``inf_max_tokens``, default 16384, sets its batch),
  written to ``results_{split}/scores_{step}.json``.
* ``re`` (``train_re.py``): :class:`~uniter_fast.data.re.ReDataset` on the ground-truth
  boxes, ``train_batch_size`` / ``val_batch_size`` expressions per batch,
  ``train_loss`` (``cls`` or ``rank``), ``margin``, ``hard_ratio``, ``mlp``; loss
  ``sum()``; validation accuracy (IoU > 0.5) on ``val`` (and ``test``) with
  ground-truth or detected boxes (``coco_gt`` in the image db's name, as the original),
  predictions to ``results_{split}/results_{step}_all.json`` (``inf_re.py``'s records).
* ``vcr`` (``train_vcr.py``): Q->A and QA->R datasets of every train db concatenated,
  token batches, ``train_img_dbs`` entries ``"gt_db;det_db"`` (``gt`` in the name: the
  ground-truth boxes, read with ``conf_th=-1, num_bb=100``), the model's
  ``init_type_embedding()`` and ``init_word_embedding(81)``, ``checkpoint_from``
  ``pretrain`` (load, then grow the embeddings) or ``vcr_pretrain`` (grow, then load the
  matching keys); loss ``mean()``; validation ``{split}/acc_qa``, ``acc_qar``, ``acc``
  (and the two losses), scores to ``results_{split}/results_{step}_all.json`` and, for a
  split without labels, the leaderboard CSV ``results_{split}/results_{step}_all.csv``.

Difference from the originals: the ``gt`` / ``coco_gt`` test looks at the image db's
directory name only (the original tested the whole path, so a parent directory named
``...gt...`` turned a detected-box db into a ground-truth one).

Built-in synthetic data (:mod:`uniter_fast.data.synthetic_tasks2`): db paths
``synthetic-itm:{train,val,test,img}``, ``synthetic-re:{train,val,test,img_gt,img_det}``,
``synthetic-vcr:{train,val,test,img_gt,img}``, generated on first use from the config's
``synthetic_task`` section; ``"checkpoint": "synthetic:pretrain"`` as for part 1.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.db import DetectFeatLmdb, TxtTokLmdb, img_db_name
from ..data.loader import ConcatDatasetWithLens, MetaLoader, TaskLoader
from ..data.sampler import TokenBucketSampler
from .finetune import (
    BUCKET_SIZE,
    ORIGINAL_KEYS,
    OWN_KEYS,
    SYNTHETIC_PRETRAIN,
    FinetuneTask,
    _atomic_write,
    ensure_synthetic_pretrain,
    world_spec,
)
from .pretrain import IMG_DIM, check_text_fits, load_model_config, set_dropout
from .task import RunContext
from .validation import reduce_sums, val_batches

__all__ = ["TASK_NAMES2", "ItmTask", "ItmHnTask", "ReTask", "VcrTask", "TASKS2",
           "ExampleSampler", "ITM_KEYS", "ITM_HN_KEYS", "RE_KEYS", "VCR_KEYS",
           "resolve_synthetic2", "is_gt_db", "CHECKPOINT_FROM", "build_part2_model",
           "make_task2"]

TASK_NAMES2 = ("itm", "itm-hn", "re", "vcr")

#: keys of the originals' configs / argparse beyond part 1's (train_itm.py,
#: train_itm_hard_negatives.py, train_re.py, train_vcr.py)
ITM_KEYS = frozenset({"negative_size", "inf_minibatch_size", "margin", "full_val"})
ITM_HN_KEYS = ITM_KEYS | {"hard_neg_size"}
RE_KEYS = frozenset({"train_loss", "margin", "hard_ratio", "mlp", "decay"})
VCR_KEYS = frozenset({"checkpoint_from"})
#: what this trainer adds: tokens per batch of the fast retrieval scorer
OWN_KEYS2 = frozenset({"inf_max_tokens"})
#: VCR's ``checkpoint_from`` values
CHECKPOINT_FROM = ("pretrain", "vcr_pretrain")

_SYNTH_PARTS = {"itm": ("train", "val", "test", "img"),
                "re": ("train", "val", "test", "img_gt", "img_det"),
                "vcr": ("train", "val", "test", "img_gt", "img")}


# ----------------------------------------------------------------------------- helpers

def _task2_spec(data_task: str, cfg: Dict[str, Any]):
    from ..data.synthetic_tasks2 import Task2Spec
    kw = dict(cfg.get("synthetic_task") or {})
    if kw.get("task", data_task) != data_task:
        raise ValueError(f"synthetic_task.task is {kw['task']!r} but this run's data is "
                         f"{data_task!r}")
    kw["task"] = data_task
    try:
        return Task2Spec(**kw)
    except TypeError as e:
        raise ValueError(f"bad 'synthetic_task' section in the training config: {e}") from None


def resolve_synthetic2(path: str, data_task: str, cfg: Dict[str, Any]) -> str:
    """A db path with ``synthetic-<task>:<part>`` made real (generated on first use);
    ``;``-separated lists (VCR's ``gt;det``) part by part."""
    if not isinstance(path, str):
        return path
    if ";" in path:
        return ";".join(resolve_synthetic2(p, data_task, cfg) for p in path.split(";"))
    prefix = "synthetic-"
    if not path.startswith(prefix) or ":" not in path:
        return path
    name, part = path[len(prefix):].split(":", 1)
    if name != data_task:
        raise ValueError(f"{path!r} is a synthetic {name} db; this run uses {data_task} data")
    if part not in _SYNTH_PARTS[data_task]:
        raise ValueError(f"unknown synthetic db {path!r}; use one of "
                         f"{[f'synthetic-{data_task}:{p}' for p in _SYNTH_PARTS[data_task]]}")
    from ..data.synthetic_tasks2 import ensure_task2_dbs
    w_cfg = dict(cfg)
    if data_task == "re":     # RE reads every image db with conf_th=-1: keep the world's rule
        for k in ("conf_th", "max_bb", "min_bb"):
            w_cfg.pop(k, None)
    return ensure_task2_dbs(_task2_spec(data_task, cfg), world_spec(w_cfg))[part]


def is_gt_db(path: str, marker: str = "gt") -> bool:
    """Whether an image db holds ground-truth boxes: ``marker`` in its directory name."""
    return marker in os.path.basename(os.path.normpath(path))


def _img_db(path: str, cfg: Dict[str, Any], conf_th: float, num_bb: int) -> DetectFeatLmdb:
    max_bb, min_bb = cfg.get("max_bb", 100), cfg.get("min_bb", 10)
    compress = cfg.get("compressed_db")
    if compress is None:
        compress = os.path.isdir(os.path.join(path, img_db_name(conf_th, max_bb, min_bb, num_bb,
                                                                True)))
    return DetectFeatLmdb(path, conf_th, max_bb, min_bb, num_bb, bool(compress),
                          cfg.get("img_dim"))


def _det_db(path: str, cfg: Dict[str, Any]) -> DetectFeatLmdb:
    return _img_db(path, cfg, cfg.get("conf_th", 0.2), cfg.get("num_bb", 36))


class ExampleSampler:
    """Batches of ``batch_size`` *examples* (the originals' ``DataLoader(batch_size=...)``),
    shuffled by ``(seed, epoch)`` when ``shuffle``; the interface of
    :class:`~uniter_fast.data.sampler.TokenBucketSampler` for :class:`TaskLoader`."""

    def __init__(self, batch_size: int, droplast: bool = False, shuffle: bool = True,
                 seed: int = 0):
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1 examples, got {batch_size}")
        self.max_tok = self.batch_size = int(batch_size)
        self.droplast, self.shuffle, self.seed = bool(droplast), bool(shuffle), int(seed)

    def batches(self, lens: Sequence[int], epoch: int) -> List[List[int]]:
        ids = list(range(len(lens)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + int(epoch)).shuffle(ids)
        out = [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        if self.droplast and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out


@contextlib.contextmanager
def _full_params(engine, ctx: RunContext):
    """Under ZeRO-3 the whole model gathered on every rank (collective), else nothing."""
    if ctx.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            yield
    else:
        yield


def _gather_list(items: List[Any], world_size: int) -> List[Any]:
    if world_size == 1:
        return items
    import torch.distributed as dist
    parts: List[Any] = [None] * world_size
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def _result_dir(ctx: RunContext, split: str) -> str:
    d = os.path.join(ctx.output_dir, f"results_{split}")
    os.makedirs(d, exist_ok=True)
    return d


def _load_state(cfg: Dict[str, Any]):
    if not cfg.get("checkpoint"):
        return None
    return torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- base

class _Part2Task(FinetuneTask):
    """Config handling and data resolution shared by the part-2 tasks."""

    #: which synthetic data the task reads (``itm-hn`` reads ``itm``'s)
    data_task = "itm"
    def _resolve(self, cfg: Dict[str, Any]) -> None:
        t = self.data_task
        cfg["train_txt_dbs"] = [resolve_synthetic2(p, t, cfg) for p in cfg["train_txt_dbs"]]
        cfg["train_img_dbs"] = [resolve_synthetic2(p, t, cfg) for p in cfg["train_img_dbs"]]
        for k in ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db"):
            if cfg.get(k) is not None:
                cfg[k] = resolve_synthetic2(cfg[k], t, cfg)
        if cfg.get("checkpoint") == SYNTHETIC_PRETRAIN:
            cfg["checkpoint"] = ensure_synthetic_pretrain(cfg, self.ds_config_path,
                                                          self.precision,
                                                          progress=self.progress)

    def _splits(self, cfg) -> List[str]:
        return [s for s in ("val", "test") if cfg.get(f"{s}_txt_db") is not None]

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["input_ids"].size(0))


# ----------------------------------------------------------------------------- ITM

class ItmTask(_Part2Task):
    """Image-text retrieval with sampled negatives (``train_itm.py``)."""

    name = "itm"
    data_task = "itm"
    head_prefixes = ("rank_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | ITM_KEYS | OWN_KEYS2

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        self.neg_size = int(cfg.get("negative_size", 1))
        if self.neg_size < 1:
            raise ValueError(f"training config negative_size must be >= 1, got "
                             f"{cfg['negative_size']}")
        self.margin = float(cfg.get("margin", 0.2))

    def _txt_img(self, cfg, train: bool):
        max_len = int(cfg.get("max_txt_len", 60)) if train else -1
        return ([TxtTokLmdb(t, max_len) for t in cfg["train_txt_dbs"]],
                [_det_db(i, cfg) for i in cfg["train_img_dbs"]])

    def train_loader(self, cfg, rank, world_size, accum_steps):
        from ..data.itm import ItmRankDataset, itm_rank_collate
        txts, imgs = self._txt_img(cfg, True)
        seed = int(cfg.get("seed", 42))
        parts = [ItmRankDataset(t, i, self.neg_size, rank=rank, world_size=world_size,
                                seed=seed) for t, i in zip(txts, imgs)]
        ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)
        sampler = ExampleSampler(int(cfg["train_batch_size"]), droplast=True,
                                 seed=seed + 7919 * rank)
        loader = TaskLoader(ds, itm_rank_collate, sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
        return MetaLoader({self.name: (loader, 1)}, accum_steps=accum_steps, seed=seed)

    def val_loaders(self, cfg, rank, world_size):
        from ..data.itm import ItmEvalDataset
        out = {}
        for split in self._splits(cfg):
            txt = TxtTokLmdb(cfg[f"{split}_txt_db"], -1)
            img = _det_db(cfg[f"{split}_img_db"], cfg)
            n_img = len(set(txt.txt2img[i] for i in txt.id2len))
            mini = min(int(cfg.get("inf_minibatch_size", 400)), n_img)
            out[split] = ItmEvalDataset(txt, img, mini, rank=rank, world_size=world_size)
        return out

    def build_model(self, cfg, meta):
        check_text_fits(load_model_config(cfg), meta, cfg)
        return build_part2_model(self.name, cfg, _load_state(cfg))

    def compute_loss(self, engine, name, batch, cfg):
        from ..model.itm import itm_rank_train_loss
        return itm_rank_train_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["attn_masks"].size(0)
                                                   // batch["sample_size"])

    def validate(self, engine, val_loaders, ctx: RunContext):
        from ..eval.itr import gather_score_matrix, itm_dataset_scores, itm_eval
        logs: Dict[str, float] = {}
        max_tok = int(ctx.cfg.get("inf_max_tokens", 16384))
        for split, ds in val_loaders.items():
            with _full_params(engine, ctx):
                scores = itm_dataset_scores(engine.module, ds, max_tokens=max_tok)
            scores, txt_ids = gather_score_matrix(scores, ds.ids)
            res = itm_eval(scores.float(), txt_ids, ds.all_img_ids, ds.txt_db.txt2img,
                           ds.img2txts)
            logs.update({f"{split}/{k}": v for k, v in res.items()})
            if ctx.rank == 0:
                _atomic_write(os.path.join(_result_dir(ctx, split), f"scores_{ctx.step}.json"),
                              json.dumps(res))
        return logs


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
    """Image-text retrieval with hard negatives (``train_itm_hard_negatives.py``)."""

    name = "itm-hn"
    data_task = "itm"
    known_keys = ORIGINAL_KEYS | OWN_KEYS | ITM_HN_KEYS | OWN_KEYS2

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        self.hard_size = int(cfg.get("hard_neg_size", 16))
        if not 1 <= self.hard_size <= self.neg_size:
            raise ValueError(f"training config hard_neg_size must be in [1, negative_size="
                             f"{self.neg_size}], got {self.hard_size}")
        accum = int(cfg["train_batch_size"])
        if accum < 1:
            raise ValueError(f"training config train_batch_size must be >= 1, got {accum}")
        # the original accumulates train_batch_size texts and images per optimizer step
        ds_config["gradient_accumulation_steps"] = accum

    def train_loader(self, cfg, rank, world_size, accum_steps):
        from ..data.itm import (
            ItmRankDatasetHardNegFromImage,
            ItmRankDatasetHardNegFromText,
            itm_rank_hn_collate,
        )
        txts, imgs = self._txt_img(cfg, True)
        seed = int(cfg.get("seed", 42))
        loaders = []
        for k, cls in enumerate((ItmRankDatasetHardNegFromText, ItmRankDatasetHardNegFromImage)):
            parts = [cls(t, i, self.neg_size, rank=rank, world_size=world_size, seed=seed)
                     for t, i in zip(txts, imgs)]
            ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)
            sampler = ExampleSampler(1, droplast=True, seed=seed + 7919 * rank + k)
            tl = TaskLoader(ds, itm_rank_hn_collate, sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
            loaders.append(MetaLoader({self.name: (tl, 1)}, accum_steps=1, seed=seed))
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


# ----------------------------------------------------------------------------- RE

def _re_datasets():
    """ReDataset / ReEvalDataset with ``set_epoch`` (the loaders' interface; the order
    comes from the sampler, seeded by (seed, epoch), so the datasets' own ``shuffle``
    is not needed)."""
    from ..data.re import ReDataset, ReEvalDataset

    class _Train(ReDataset):
        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

    class _Eval(ReEvalDataset):
        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

    return _Train, _Eval


class ReTask(_Part2Task):
    """Referring expressions (``train_re.py``)."""

    name = "re"
    data_task = "re"
    head_prefixes = ("re_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | RE_KEYS

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        loss = cfg.get("train_loss", "cls")
        if loss not in ("cls", "rank"):
            raise ValueError(f"training config train_loss must be 'cls' or 'rank', got {loss!r}")

    def _img(self, path, cfg) -> DetectFeatLmdb:
        gt = is_gt_db(path, "coco_gt")
        return _img_db(path, cfg, -1 if gt else cfg.get("conf_th", 0.2),
                       100 if gt else cfg.get("num_bb", 36))

    def train_loader(self, cfg, rank, world_size, accum_steps):
        from ..data.re import ReTxtTokLmdb, re_collate
        ReDataset, _ = _re_datasets()
        seed = int(cfg.get("seed", 42))
        parts = [ReDataset(ReTxtTokLmdb(t, int(cfg.get("max_txt_len", 60))), self._img(i, cfg),
                           rank=rank, world_size=world_size, seed=seed)
                 for t, i in zip(cfg["train_txt_dbs"], cfg["train_img_dbs"])]
        ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)
        sampler = ExampleSampler(int(cfg["train_batch_size"]), droplast=False,
                                 seed=seed + 7919 * rank)
        loader = TaskLoader(ds, re_collate, sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
        return MetaLoader({self.name: (loader, 1)}, accum_steps=accum_steps, seed=seed)

    def val_loaders(self, cfg, rank, world_size):
        from ..data.re import ReTxtTokLmdb, re_eval_collate
        _, ReEvalDataset = _re_datasets()
        out = {}
        for split in self._splits(cfg):
            path = cfg[f"{split}_img_db"]
            ds = ReEvalDataset(ReTxtTokLmdb(cfg[f"{split}_txt_db"], -1), self._img(path, cfg),
                               use_gt_feat=is_gt_db(path, "coco_gt"), rank=rank,
                               world_size=world_size)
            bs = int(cfg.get("val_batch_size") or cfg["train_batch_size"])
            out[split] = TaskLoader(ds, re_eval_collate, ExampleSampler(bs, shuffle=False))
        return out

    def build_model(self, cfg, meta):
        check_text_fits(load_model_config(cfg), meta, cfg)
        return build_part2_model(self.name, cfg, _load_state(cfg))

    def compute_loss(self, engine, name, batch, cfg):
        from ..model.re import re_train_loss
        return re_train_loss(engine(batch, compute_loss=True)), {}

    def validate(self, engine, val_loaders, ctx: RunContext):
        from ..eval.re import re_accuracy, re_eval_batch
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
            preds = _gather_list(preds, ctx.world_size)
            logs[f"{split}/acc"] = re_accuracy(int(tot["correct"]), int(tot["n"]))
            if ctx.rank == 0:
                _atomic_write(os.path.join(_result_dir(ctx, split),
                                           f"results_{ctx.step}_all.json"), json.dumps(preds))
        return logs


# ----------------------------------------------------------------------------- VCR

class VcrTask(_Part2Task):
    """VCR Q->A and QA->R (``train_vcr.py``)."""

    name = "vcr"
    data_task = "vcr"
    head_prefixes = ("vcr_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | VCR_KEYS

    def configure(self, cfg, ds_config, args) -> None:
        super().configure(cfg, ds_config, args)
        cfg.setdefault("checkpoint_from", "pretrain")
        if cfg["checkpoint_from"] not in CHECKPOINT_FROM:
            raise ValueError(f"training config checkpoint_from must be one of {CHECKPOINT_FROM}"
                             f", got {cfg['checkpoint_from']!r}")

    def prepare_data(self, cfg, rank):
        from ..data.vcr import VcrTxtTokLmdb
        self._resolve(cfg)
        dbs = cfg["train_txt_dbs"] + [cfg[k] for k in ("val_txt_db", "test_txt_db")
                                      if cfg.get(k)]
        metas = [VcrTxtTokLmdb(p, -1, "qa").meta for p in dbs]
        for m, p in zip(metas[1:], dbs[1:]):
            if m.get("bert") != metas[0].get("bert"):
                raise ValueError(f"text db {p} uses tokenizer {m.get('bert')!r}, "
                                 f"{dbs[0]} uses {metas[0].get('bert')!r}")
        self._meta = metas[0]

    def _img_dbs(self, spec: str, cfg):
        """(gt db or None, detected db or None) of a ``"gt;det"`` entry (the original's
        ``load_img_feat``)."""
        parts = spec.split(";")
        if len(parts) > 2:
            raise ValueError(f"VCR image db entry {spec!r}: more than two image dbs")
        gt = [p for p in parts if is_gt_db(p)]
        det = [p for p in parts if not is_gt_db(p)]
        if len(gt) > 1 or len(det) > 1:
            raise ValueError(f"VCR image db entry {spec!r}: expected one ground-truth db (name "
                             "with 'gt') and/or one detected db")
        return (_img_db(gt[0], cfg, -1, 100) if gt else None,
                _det_db(det[0], cfg) if det else None)

    def train_loader(self, cfg, rank, world_size, accum_steps):
        from ..data.vcr import VcrDataset, VcrTxtTokLmdb, vcr_collate
        seed = int(cfg.get("seed", 42))
        parts = []
        for t, i in zip(cfg["train_txt_dbs"], cfg["train_img_dbs"]):
            gt, det = self._img_dbs(i, cfg)
            for task in ("qa", "qar"):
                parts.append(VcrDataset(VcrTxtTokLmdb(t, int(cfg.get("max_txt_len", 120)), task),
                                        img_db_gt=gt, img_db=det, rank=rank,
                                        world_size=world_size, seed=seed))
        ds = ConcatDatasetWithLens(parts)
        sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                     int(cfg["train_batch_size"]), droplast=True,
                                     seed=seed + 7919 * rank)
        loader = TaskLoader(ds, vcr_collate, sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
        return MetaLoader({self.name: (loader, 1)}, accum_steps=accum_steps, seed=seed)

    def val_loaders(self, cfg, rank, world_size):
        from ..data.vcr import VcrEvalDataset, VcrTxtTokLmdb, vcr_eval_collate
        out = {}
        for split in self._splits(cfg):
            txt = VcrTxtTokLmdb(cfg[f"{split}_txt_db"], -1, "qa,qar")
            first = txt[next(iter(txt.id2len))]
            layout = "val" if first["qa_target"] >= 0 else "test"
            gt, det = self._img_dbs(cfg[f"{split}_img_db"], cfg)
            ds = VcrEvalDataset(layout, txt, img_db_gt=gt, img_db=det, rank=rank,
                                world_size=world_size)
            bs = int(cfg.get("val_batch_size") or 10)
            out[split] = TaskLoader(ds, vcr_eval_collate, ExampleSampler(bs, shuffle=False))
        return out

    def build_model(self, cfg, meta):
        check_text_fits(load_model_config(cfg), meta, cfg)
        return build_part2_model(self.name, cfg, _load_state(cfg))

    def compute_loss(self, engine, name, batch, cfg):
        from ..model.vcr import vcr_train_loss
        return vcr_train_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["attn_masks"].size(0)) // 4

    def validate(self, engine, val_loaders, ctx: RunContext):
        from ..eval.vcr import VcrEvaluator, write_vcr_submission
        logs: Dict[str, float] = {}
        for split, loader in val_loaders.items():
            ev = VcrEvaluator()
            labelled = loader.dataset.split == "val"
            for b, real in val_batches(loader, ctx):
                scores = engine(b, compute_loss=False)
                if real:
                    ev.update(scores, b)
            tot = reduce_sums(dict(zip(ev.KEYS, ev.totals())), ev.KEYS, ctx.world_size)
            results = dict(_gather_list(list(ev.results.items()), ctx.world_size))
            if labelled:
                logs.update({f"{split}/{k}": v
                             for k, v in ev.metrics([tot[k] for k in ev.KEYS]).items()})
            if ctx.rank == 0:
                d = _result_dir(ctx, split)
                _atomic_write(os.path.join(d, f"results_{ctx.step}_all.json"),
                              json.dumps(results))
                if not labelled:
                    write_vcr_submission(results, os.path.join(d, f"results_{ctx.step}_all.csv"))
        return logs


def build_part2_model(task: str, cfg: Dict[str, Any], state=None) -> torch.nn.Module:
    """The task model as the original scripts build it from the training config
    (``state`` None: random weights), then the config's dropout."""
    config = load_model_config(cfg)
    img_dim = int(cfg.get("img_dim") or IMG_DIM)
    margin = float(cfg.get("margin", 0.2))
    if task in ("itm", "itm-hn"):
        from ..model import itm
        if task == "itm":
            model = itm.UniterForImageTextRetrieval.from_pretrained(config, state,
                                                                    img_dim=img_dim,
                                                                    margin=margin)
        else:
            model = itm.UniterForImageTextRetrievalHardNeg.from_pretrained(
                config, state, img_dim=img_dim, margin=margin,
                hard_size=int(cfg.get("hard_neg_size", 16)))
        if state is not None and not itm.has_rank_output(state, model):
            model.init_output()       # the original's intent (its key test always failed)
    elif task == "re":
        from ..model.re import UniterForReferringExpressionComprehension as Re
        model = Re.from_pretrained(config, state, img_dim=img_dim,
                                   loss=cfg.get("train_loss", "cls"), margin=margin,
                                   hard_ratio=float(cfg.get("hard_ratio", 0.3)),
                                   mlp=int(cfg.get("mlp", 1)))
    elif task == "vcr":
        from ..model.vcr import VCR_NUM_SPECIAL_TOKENS
        from ..model.vcr import UniterForVisualCommonsenseReasoning as Vcr
        from_vcr = cfg.get("checkpoint_from", "pretrain") == "vcr_pretrain"
        model = Vcr.from_pretrained(config, None if from_vcr else state, img_dim=img_dim)
        model.init_type_embedding()
        model.init_word_embedding(VCR_NUM_SPECIAL_TOKENS)
        if from_vcr and state is not None:
            own = dict(model.named_parameters())
            matched = {k: v for k, v in state.items() if k in own}
            if not matched:
                raise ValueError(f"checkpoint {cfg.get('checkpoint')}: no key matches "
                                 f"{type(model).__name__} (checkpoint_from vcr_pretrain)")
            model.load_state_dict(matched, strict=False)
    else:
        raise ValueError(f"not a part-2 fine-tuning task: {task!r} (expected one of "
                         f"{TASK_NAMES2})")
    set_dropout(model, cfg.get("dropout"))
    return model


TASKS2: Dict[str, type] = {"itm": ItmTask, "itm-hn": ItmHnTask, "re": ReTask, "vcr": VcrTask}


def make_task2(name: str) -> Optional[FinetuneTask]:
    """The part-2 task ``name`` (None if it is not one)."""
    cls = TASKS2.get(name)
    return cls() if cls is not None else None
