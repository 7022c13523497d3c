"""Build pretraining loaders from a UNITER-style training config.

``train_datasets`` / ``val_datasets`` entries look like UNITER's::

    {"name": "coco", "db": ["/txt/pretrain_coco_train.db"], "img": ["/img/coco_train2014"],
     "tasks": ["itm", "mlm", "mrfr", "mrckl"], "mix_ratio": [2, 2, 1, 1]}

A db/img path ``synthetic:train`` / ``synthetic:val`` / ``synthetic:img`` means
the built-in synthetic dataset (generated on first use from the config's
``synthetic`` section); relative paths are taken from the current directory.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from ..constants import BUCKET_SIZE
from .collate import collate_fn_for
from .datasets import build_dataset
from .db import DetectFeatLmdb, TxtTokLmdb, open_img_db
from .loader import ConcatDatasetWithLens, MetaLoader, TaskLoader
from .sampler import TokenBucketSampler, config_seed, rank_seed
from .synthetic import SyntheticSpec, ensure_synthetic

__all__ = ["resolve_path", "create_train_loader", "create_val_loaders", "text_meta",
           "SYNTHETIC_PREFIX", "TASK_ALIASES"]

SYNTHETIC_PREFIX = "synthetic:"
TASK_ALIASES = {"mrckl": "mrc-kl", "mrc-kl": "mrc-kl", "mlm": "mlm", "mrfr": "mrfr",
                "mrc": "mrc", "itm": "itm"}


def _synthetic_paths(cfg: Dict[str, Any]) -> Dict[str, Any]:
    spec_kw = dict(cfg.get("synthetic") or {})
    # the generated image db must match the box rule the training reads with
    for k in ("conf_th", "max_bb", "min_bb"):
        if k in cfg:
            spec_kw.setdefault(k, cfg[k])
    try:
        spec = SyntheticSpec(**spec_kw)
    except TypeError as e:
        raise ValueError(f"bad 'synthetic' section in the training config: {e}") from None
    return ensure_synthetic(spec)


def resolve_path(path: str, cfg: Dict[str, Any]) -> str:
    if path.startswith(SYNTHETIC_PREFIX):
        part = path[len(SYNTHETIC_PREFIX):]
        paths = _synthetic_paths(cfg)
        if part not in ("train", "val", "img"):
            raise ValueError(f"unknown synthetic db {path!r}; use synthetic:train, "
                             "synthetic:val or synthetic:img")
        return paths[part]
    return path


def task_of(name: str) -> str:
    """Model task of a loader name like ``mrckl_coco`` (UNITER: ``name.split('_')[0]``)."""
    t = name.split("_")[0]
    if t not in TASK_ALIASES:
        raise ValueError(f"unknown task {t!r} in {name!r}")
    return TASK_ALIASES[t]


class _ImgDbGroup:
    def __init__(self, cfg):
        self.cfg, self.dbs = cfg, {}

    def __getitem__(self, path: str) -> DetectFeatLmdb:
        if path not in self.dbs:
            self.dbs[path] = open_img_db(path, dict(self.cfg, compressed_db=self.cfg.get(
                "compressed_db", True)))
        return self.dbs[path]


def text_meta(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """meta.json of the first training text db (all must agree on the tokenizer)."""
    metas = []
    for key in ("train_datasets", "val_datasets"):
        for d in cfg.get(key) or []:
            for db in d["db"]:
                metas.append(TxtTokLmdb(resolve_path(db, cfg), -1).meta)
    if not metas:
        raise ValueError("the training config lists no datasets")
    for m in metas[1:]:
        if m.get("bert") != metas[0].get("bert"):
            raise ValueError(f"text dbs use different tokenizers: {m.get('bert')!r} vs "
                             f"{metas[0].get('bert')!r}")
    return metas[0]


def _check_entry(d: Dict[str, Any], train: bool) -> None:
    for k in ("name", "db", "img", "tasks"):
        if k not in d:
            raise ValueError(f"dataset entry {d.get('name', '?')!r} lacks {k!r}")
    if len(d["db"]) != len(d["img"]):
        raise ValueError(f"dataset {d['name']!r}: 'db' and 'img' must have the same length")
    if train and len(d["tasks"]) != len(d.get("mix_ratio", [])):
        raise ValueError(f"dataset {d['name']!r}: 'tasks' and 'mix_ratio' must have the same "
                         "length")
    if "_" in d["name"]:
        raise ValueError(f"dataset name {d['name']!r} must not contain '_'")


def _dataset(task: str, d: Dict[str, Any], cfg, imgs: _ImgDbGroup, rank: int, world: int,
             max_txt_len: int, masking: str = "conditional"):
    parts = []
    for db, img in zip(d["db"], d["img"]):
        txt_db = TxtTokLmdb(resolve_path(db, cfg), max_txt_len)
        parts.append(build_dataset(task, txt_db, imgs[resolve_path(img, cfg)],
                                   mrm_prob=cfg.get("mrm_prob", 0.15),
                                   itm_neg_prob=cfg.get("itm_neg_prob", 0.5),
                                   rank=rank, world_size=world, seed=config_seed(cfg),
                                   masking=masking))
    return parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)


def create_train_loader(cfg: Dict[str, Any], rank: int = 0, world_size: int = 1,
                        accum_steps: int = 1) -> MetaLoader:
    imgs = _ImgDbGroup(cfg)
    loaders: Dict[str, Tuple[TaskLoader, int]] = {}
    seed = config_seed(cfg)
    for d in cfg["train_datasets"]:
        _check_entry(d, True)
        for t, ratio in zip(d["tasks"], d["mix_ratio"]):
            task = task_of(t)
            name = f"{t}_{d['name']}"
            # "masking" (conditional / joint ablation) applies to training only: validation
            # always sees the other modality intact
            ds = _dataset(task, d, cfg, imgs, rank, world_size, cfg.get("max_txt_len", 60),
                          cfg.get("masking", "conditional"))
            sampler = TokenBucketSampler(cfg.get("bucket_size", BUCKET_SIZE), cfg["train_batch_size"],
                                         droplast=True, seed=rank_seed(cfg, rank))
            loaders[name] = (TaskLoader(ds, collate_fn_for(task, cfg.get("itm_ot_lambda", 0.0)),
                                        sampler, cfg.get("n_workers", 0),
                                        cfg.get("pin_mem", False)), ratio)
    # the task RNG is seeded identically on every rank: all ranks train the same task
    return MetaLoader(loaders, accum_steps=accum_steps, seed=seed)


def create_val_loaders(cfg: Dict[str, Any], rank: int = 0, world_size: int = 1
                       ) -> Dict[str, TaskLoader]:
    """One pass of each validation task (``TaskLoader.epoch_batches()``)."""
    imgs = _ImgDbGroup(cfg)
    out = {}
    for d in cfg.get("val_datasets") or []:
        _check_entry(d, False)
        for t in d["tasks"]:
            task = task_of(t)
            ds = _dataset(task, d, cfg, imgs, rank, world_size, -1)
            sampler = TokenBucketSampler(cfg.get("bucket_size", BUCKET_SIZE),
                                         cfg.get("val_batch_size", cfg["train_batch_size"]),
                                         droplast=False, seed=config_seed(cfg))
            out[f"{t}_{d['name']}"] = TaskLoader(ds, collate_fn_for(task,
                                                 cfg.get("itm_ot_lambda", 0.0)), sampler)
    return out
