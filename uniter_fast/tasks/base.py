"""The interface of a downstream task, and the pieces the tasks share.

A task (one module of :mod:`uniter_fast.tasks`) is a :class:`FinetuneTask`: everything
specific to it -- config keys and defaults, model construction, datasets and loaders,
loss, validation metric, result files, inference, the export check, its synthetic
data -- lives in its module; the shared :class:`~uniter_fast.training.loop.Trainer`
(``finetune.py``), ``python -m uniter_fast.infer`` and ``python -m uniter_fast.export``
look it up in the registry and call it.

Shared here: the original fine-tuning configs' keys and their normalisation, the
command-line overrides, synthetic db paths (``synthetic-<data>:<part>``, generated on
first use from the config's ``synthetic_task`` section) and the cached pretraining run
(``"checkpoint": "synthetic:pretrain"``), token-bucket loaders, the ``lr_mul`` parameter
groups, validation helpers (gather over ranks, atomic result writes), strict weight
loading and the DeepSpeed checkpoint made from a plain state dict (``export from-pt``).
"""
from __future__ import annotations

import abc
import contextlib
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import checkpoint as ckpt_lib
from ..config import CONFIG_DIR
from ..constants import BUCKET_SIZE
from ..data.db import TxtTokLmdb, open_img_db
from ..data.loader import ConcatDatasetWithLens, MetaLoader, TaskLoader
from ..data.sampler import TokenBucketSampler, config_seed, rank_seed
from ..data.synthetic_tasks import ensure_task_dbs, make_spec
from ..export import check_keys, load_state_dict_file
from ..model.build import DEFAULT_MAX_TXT_LEN, check_text_fits, load_model_config
from ..model.model import weights_loaded_next
from ..training.config import OVERRIDES, read_json
from ..training.engine import param_groups as _param_groups
from ..training.synthetic_pretrain import (
    SYNTHETIC_PRETRAIN,
    ensure_synthetic_pretrain,
    fresh_unseen_embeddings,
    world_spec,
)
from ..training.task import RunContext, TrainTask
from .inference import load_pretrained_weights, load_strict, load_weights

__all__ = ["FinetuneTask", "DESCRIPTION", "ORIGINAL_KEYS", "OWN_KEYS", "FINETUNE_OVERRIDES",
           "CLI_OVERRIDES", "default_config", "normalize_config", "resolve_synthetic",
           "token_bucket_train_loader", "token_bucket_val_loaders", "example_loader",
           "gather_lists", "result_dir", "load_state", "full_params",
           "is_gt_db", "run_config", "task_checkpoint_from_state_dict"]

DESCRIPTION = "UNITER fine-tuning under DeepSpeed."

#: every key the original fine-tuning scripts (train_vqa.py, train_ve.py, train_nlvr2.py,
#: train_itm.py, train_re.py, train_vcr.py, ...) read from a training config, beside the
#: task-specific ones each task adds to its ``known_keys``
ORIGINAL_KEYS = frozenset({
    "train_txt_dbs", "train_img_dbs", "train_txt_db", "train_img_db", "val_txt_db",
    "val_img_db", "test_txt_db", "test_img_db", "compressed_db", "model_config", "checkpoint",
    "output_dir", "max_txt_len", "conf_th", "max_bb", "min_bb", "num_bb", "train_batch_size",
    "val_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_mul", "valid_steps",
    "num_train_steps", "optim", "betas", "dropout", "weight_decay", "grad_norm", "warmup_steps",
    "seed", "fp16", "n_workers", "pin_mem", "model", "use_img_type"})
#: what this trainer adds
OWN_KEYS = frozenset({"save_steps", "log_steps", "keep_checkpoints", "bucket_size", "img_dim",
                      "ans2label", "synthetic_task", "synthetic_pretrain"})

#: (name, type, help): fine-tuning options of finetune.py's command line (config keys)
FINETUNE_OVERRIDES: Tuple[Tuple[str, type, str], ...] = (
    ("lr_mul", float, "learning-rate multiplier of the task head's parameter groups"),
    ("model", str, "NLVR2 model: paired, triplet or paired-attn"),
    ("ans2label", str, "VQA answer vocabulary JSON (default: the original's 3129 answers)"),
)
#: pretraining-only overrides left off finetune.py's command line
_PRETRAIN_ONLY = ("itm_ot_lambda", "mrm_prob", "itm_neg_prob")
CLI_OVERRIDES = tuple(o for o in OVERRIDES if o[0] not in _PRETRAIN_ONLY) + FINETUNE_OVERRIDES

#: the db keys of a fine-tuning config beside the training lists
_SPLIT_DB_KEYS = ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db")
_SYNTH_PREFIX = "synthetic-"


def default_config(task_name: str) -> str:
    """The task's packaged synthetic config (``configs/finetune-<task>-synthetic-tiny.json``)."""
    return os.path.join(CONFIG_DIR, f"finetune-{task_name}-synthetic-tiny.json")


# ----------------------------------------------------------------------------- config

def _as_list(cfg: Dict[str, Any], plural: str, single: str) -> Optional[List[str]]:
    if cfg.get(plural) is not None and cfg.get(single) is not None:
        raise ValueError(f"training config: give {plural!r} or {single!r}, not both")
    v = cfg.get(plural, cfg.get(single))
    if v is None:
        return None
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f"training config {plural}/{single} must be a path or a non-empty list "
                         f"of paths, got {v!r}")
    return list(v)


def normalize_config(cfg: Dict[str, Any], default_lr_mul: float = 1.0) -> None:
    """Check and complete the part of an original-format fine-tuning config every task
    shares, in place: single-db keys become lists (``train_txt_dbs``, ``train_img_dbs``),
    ``lr_mul`` defaults to the task's (the original scripts' argparse defaults), wrong
    combinations raise ``ValueError`` naming the keys."""
    txt = _as_list(cfg, "train_txt_dbs", "train_txt_db")
    img = _as_list(cfg, "train_img_dbs", "train_img_db")
    if txt is None or img is None:
        raise ValueError("training config lacks 'train_txt_dbs'/'train_txt_db' or "
                         "'train_img_dbs'/'train_img_db'")
    if len(txt) != len(img):
        raise ValueError(f"training config: {len(txt)} train text dbs but {len(img)} image dbs")
    cfg.pop("train_txt_db", None)
    cfg.pop("train_img_db", None)
    cfg["train_txt_dbs"], cfg["train_img_dbs"] = txt, img
    for split in ("val", "test"):
        t, i = cfg.get(f"{split}_txt_db"), cfg.get(f"{split}_img_db")
        if (t is None) != (i is None):
            raise ValueError(f"training config: {split}_txt_db and {split}_img_db go together")
        if t is not None and not (isinstance(t, str) and isinstance(i, str)):
            raise ValueError(f"training config {split}_txt_db/{split}_img_db must be paths")
    if cfg.get("lr_mul") is None:
        cfg["lr_mul"] = float(default_lr_mul)
    if float(cfg["lr_mul"]) <= 0:
        raise ValueError(f"training config lr_mul must be > 0, got {cfg['lr_mul']}")
    optim = cfg.get("optim", "adamw")
    if optim not in ("adamw", "adam"):
        raise ValueError(f"training config optim must be 'adamw' or 'adam' (DeepSpeed's "
                         f"AdamW/Adam on torch.optim), got {optim!r}")
    if int(cfg.get("gradient_accumulation_steps", 1)) < 1:
        raise ValueError("training config gradient_accumulation_steps must be >= 1, got "
                         f"{cfg['gradient_accumulation_steps']}")


def _apply_optim(cfg: Dict[str, Any], ds: Dict[str, Any]) -> None:
    """UNITER's ``optim`` on the DeepSpeed config: adamw -> AdamW, adam -> Adam (L2 decay)."""
    if cfg.get("optim") is None:
        return
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    if cfg["optim"] == "adamw":
        opt["type"] = "AdamW"
        params["adam_w_mode"] = True
    else:
        opt["type"] = "Adam"
        params["adam_w_mode"] = False


def run_config(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """The ``train_config.json`` of the run whose ``ckpt/`` is ``ckpt_dir`` (None: none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir.rstrip("/"))),
                        "train_config.json")
    return read_json(path, "training config") if os.path.exists(path) else None


def is_gt_db(path: str, marker: str = "gt") -> bool:
    """Whether an image db holds ground-truth boxes: ``marker`` in its directory name."""
    return marker in os.path.basename(os.path.normpath(path))


# ----------------------------------------------------------------------------- synthetic data

def resolve_synthetic(path: Any, task: "FinetuneTask", cfg: Dict[str, Any]) -> Any:
    """A db path with ``synthetic-<data>:<part>`` made real (generated on first use from the
    config's ``synthetic_task`` section, in the world of its ``synthetic_pretrain``);
    ``;``-separated lists (VCR's ``gt;det``) part by part; other paths unchanged."""
    if not isinstance(path, str):
        return path
    if ";" in path:
        return ";".join(resolve_synthetic(p, task, cfg) for p in path.split(";"))
    if not path.startswith(_SYNTH_PREFIX) or ":" not in path:
        return path
    gen = task.synthetic_data
    name, part = path[len(_SYNTH_PREFIX):].split(":", 1)
    if gen is None or name != gen.NAME:
        have = f"uses {gen.NAME} data" if gen is not None else "has no synthetic data"
        raise ValueError(f"{path!r} is a synthetic {name} db; this run ({task.name}) {have}")
    if part not in gen.PARTS:
        raise ValueError(f"unknown synthetic db {path!r}; use one of "
                         f"{[f'{_SYNTH_PREFIX}{name}:{p}' for p in gen.PARTS]}")
    spec = make_spec(gen, cfg.get("synthetic_task"))
    return ensure_task_dbs(gen, spec, task.synthetic_world(cfg))[part]


# ----------------------------------------------------------------------------- loaders

def _train_dbs(cfg) -> Iterable[Tuple[str, str]]:
    return zip(cfg["train_txt_dbs"], cfg["train_img_dbs"])


def token_bucket_train_loader(task_name: str, cfg: Dict[str, Any], rank: int, world_size: int,
                              accum_steps: int, make_dataset: Callable, collate: Callable
                              ) -> MetaLoader:
    """Token-bucket batches (``train_batch_size`` tokens) of the concatenated training dbs;
    ``make_dataset(txt_db, img_db, rank, world_size, seed)`` builds one part."""
    max_len = int(cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN))
    imgs: Dict[str, Any] = {}
    parts = []
    for t, i in _train_dbs(cfg):
        if i not in imgs:
            imgs[i] = open_img_db(i, cfg)
        parts.append(make_dataset(TxtTokLmdb(t, max_len), imgs[i], rank, world_size,
                                  config_seed(cfg)))
    ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)
    sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                 int(cfg["train_batch_size"]), droplast=True,
                                 seed=rank_seed(cfg, rank))
    loader = TaskLoader(ds, collate, sampler, int(cfg.get("n_workers", 0)),
                        bool(cfg.get("pin_mem", False)))
    return MetaLoader({task_name: (loader, 1)}, accum_steps=accum_steps, seed=config_seed(cfg))


def token_bucket_val_loaders(cfg: Dict[str, Any], splits: Sequence[str], rank: int,
                             world_size: int, make_dataset: Callable, collate: Callable
                             ) -> Dict[str, TaskLoader]:
    """One token-bucket loader (``val_batch_size`` tokens) per split in ``splits``."""
    out = {}
    for split in splits:
        ds = make_dataset(TxtTokLmdb(cfg[f"{split}_txt_db"], -1),
                          open_img_db(cfg[f"{split}_img_db"], cfg), rank, world_size,
                          config_seed(cfg))
        sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                     int(cfg.get("val_batch_size") or cfg["train_batch_size"]),
                                     droplast=False, seed=config_seed(cfg))
        out[split] = TaskLoader(ds, collate, sampler)
    return out


def example_loader(task_name: str, cfg: Dict[str, Any], parts: Sequence[Any], collate: Callable,
                   sampler, accum_steps: int) -> MetaLoader:
    """A training loader over the concatenated ``parts`` with ``sampler``."""
    ds = parts[0] if len(parts) == 1 else ConcatDatasetWithLens(list(parts))
    loader = TaskLoader(ds, collate, sampler, int(cfg.get("n_workers", 0)),
                        bool(cfg.get("pin_mem", False)))
    return MetaLoader({task_name: (loader, 1)}, accum_steps=accum_steps, seed=config_seed(cfg))


# ----------------------------------------------------------------------------- validation

def gather_lists(items: List[Any], world_size: int) -> List[Any]:
    """Every rank's ``items`` concatenated in rank order (on every rank)."""
    if world_size == 1:
        return items
    import torch.distributed as dist
    parts: List[Any] = [None] * world_size
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def result_dir(ctx: RunContext, split: str) -> str:
    """``<output_dir>/results_<split>/`` (made if missing)."""
    d = os.path.join(ctx.output_dir, f"results_{split}")
    os.makedirs(d, exist_ok=True)
    return d


@contextlib.contextmanager
def full_params(engine, ctx: RunContext):
    """Under ZeRO-3 the whole model gathered on every rank (collective), else nothing."""
    if ctx.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            yield
    else:
        yield


def load_state(cfg: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The training config's ``checkpoint`` (a plain state dict file, or a run directory /
    its ``ckpt/`` / a tag directory, as ``infer --checkpoint`` takes; None: random weights)."""
    if not cfg.get("checkpoint"):
        return None
    path = cfg["checkpoint"]
    return load_pretrained_weights(path) if os.path.isdir(path) else load_state_dict_file(path)


# ----------------------------------------------------------------------------- the interface

class FinetuneTask(TrainTask, abc.ABC):
    """A downstream task: what the trainer, inference and export need from it.

    Class attributes a task sets: ``name`` (its registry name), ``head_prefixes`` (the
    parameter-name prefixes of its head: the ``lr_mul`` groups), ``known_keys`` (its
    config keys), ``default_lr_mul`` (the original script's default), ``synthetic_data``
    (its generator module of :mod:`uniter_fast.data.synthetic_tasks`, or None),
    ``reinit_unseen_words`` (fresh embeddings for words the synthetic pretraining never
    saw, see :func:`~uniter_fast.training.synthetic_pretrain.fresh_unseen_embeddings`),
    ``prepro_formats`` (the annotation formats its :meth:`prepro` reads).
    """

    name: str = ""
    required_keys = ("output_dir", "num_train_steps", "train_batch_size", "model_config")
    known_keys = ORIGINAL_KEYS | OWN_KEYS
    head_prefixes: Tuple[str, ...] = ()
    default_lr_mul: float = 1.0
    synthetic_data: Any = None
    reinit_unseen_words: bool = False
    #: help of infer's --batch_size (tokens or examples, as the task batches)
    infer_batch_help: str = "batch size"
    #: the annotation formats ``python -m uniter_fast.prepro`` reads for this task (name ->
    #: the files it takes); empty: the task has no preprocessing
    prepro_formats: Dict[str, str] = {}

    def __init__(self):
        self.ds_config_path = "ds.json"
        self._args = None
        self.progress = True

    @property
    def precision(self) -> Optional[str]:
        """``--precision`` as the Trainer settled it (fp32 where bf16 would be emulated)."""
        return getattr(self._args, "precision", None)

    # ---------------------------------------------------------------- config
    def configure(self, cfg, ds_config, args) -> None:
        for name, _, _ in FINETUNE_OVERRIDES:
            v = getattr(args, name, None)
            if v is not None:
                cfg[name] = v
        self.normalize(cfg)
        _apply_optim(cfg, ds_config)
        self.ds_config_path = getattr(args, "deepspeed_config", None) or "ds.json"
        self._args = args    # its precision is final only after the Trainer's setup
        self.progress = not getattr(args, "no_progress", False)

    def normalize(self, cfg: Dict[str, Any]) -> None:
        """Check and complete an original-format training config of this task in place."""
        normalize_config(cfg, self.default_lr_mul)
        self.check_config(cfg)

    def check_config(self, cfg: Dict[str, Any]) -> None:
        """The task's own keys checked and completed in place (training and inference)."""
        if cfg.get("model") is not None:
            raise ValueError(f"training config key 'model' ({cfg['model']!r}) selects the "
                             f"NLVR2 variant; task {self.name} has none")

    def splits(self, cfg: Dict[str, Any]) -> List[str]:
        """The validation splits the config names (``val``, ``test``)."""
        return [s for s in ("val", "test") if cfg.get(f"{s}_txt_db") is not None]

    # ---------------------------------------------------------------- data
    def synthetic_world(self, cfg: Dict[str, Any]):
        """The synthetic world the task's synthetic dbs are drawn in (with the config's
        box rule)."""
        return world_spec(cfg)

    def resolve(self, cfg: Dict[str, Any]) -> None:
        """Synthetic paths and checkpoint made real (generated on first use)."""
        cfg["train_txt_dbs"] = [resolve_synthetic(p, self, cfg) for p in cfg["train_txt_dbs"]]
        cfg["train_img_dbs"] = [resolve_synthetic(p, self, cfg) for p in cfg["train_img_dbs"]]
        for k in _SPLIT_DB_KEYS:
            if cfg.get(k) is not None:
                cfg[k] = resolve_synthetic(cfg[k], self, cfg)
        if cfg.get("checkpoint") == SYNTHETIC_PRETRAIN:
            cfg["checkpoint"] = ensure_synthetic_pretrain(cfg, self.ds_config_path,
                                                          self.precision,
                                                          progress=self.progress)

    def text_meta(self, txt_db: str) -> Dict[str, Any]:
        """``meta.json`` of a text db of this task."""
        return TxtTokLmdb(txt_db, -1).meta

    def prepare_data(self, cfg, rank):
        self.resolve(cfg)
        dbs = cfg["train_txt_dbs"] + [cfg[k] for k in ("val_txt_db", "test_txt_db")
                                      if cfg.get(k)]
        metas = [self.text_meta(p) for p in dbs]
        for m, p in zip(metas[1:], dbs[1:]):
            if m.get("bert") != metas[0].get("bert"):
                raise ValueError(f"text db {p} uses tokenizer {m.get('bert')!r}, "
                                 f"{dbs[0]} uses {metas[0].get('bert')!r}")
        self._meta = metas[0]
        if rank == 0:
            self.write_run_files(cfg, os.path.join(cfg["output_dir"], "ckpt"))

    def write_run_files(self, cfg: Dict[str, Any], ckpt_dir: str) -> None:
        """Files the original writes beside the checkpoints (VQA: ``ans2label.json``)."""

    def data_meta(self, cfg):
        return self._meta

    # ---------------------------------------------------------------- model
    @abc.abstractmethod
    def make_model(self, cfg: Dict[str, Any], state=None) -> torch.nn.Module:
        """The task model as the original script builds it from the training config
        (``state`` None: random weights), with the config's dropout."""

    def longest_eval_text(self, txt_db: str) -> Optional[int]:
        """Tokens of the longest text of a validation/test db as the model reads it (None:
        not known up front)."""
        lens = TxtTokLmdb(txt_db, -1).id2len.values()
        return max(lens) + 2 if lens else None          # [CLS] ... [SEP]

    def check_eval_texts(self, config, cfg: Dict[str, Any]) -> None:
        """Every validation/test text fits the position table (validation reads whole texts,
        so a long one would otherwise fail at the first validation, after training)."""
        limit = config.max_position_embeddings
        for split in self.splits(cfg):
            db = cfg[f"{split}_txt_db"]
            n = self.longest_eval_text(db)
            if n is not None and n > limit:
                raise ValueError(f"{split}_txt_db {db}: its longest text is {n} tokens with "
                                 f"[CLS]/[SEP], more than the model's max_position_embeddings "
                                 f"{limit} ({cfg.get('model_config')})")

    def build_model(self, cfg, meta):
        config = load_model_config(cfg)
        check_text_fits(config, meta, cfg)
        self.check_eval_texts(config, cfg)
        state = load_state(cfg)
        model = self.make_model(cfg, state)
        if self.reinit_unseen_words and state is not None and meta.get("v_range"):
            fresh_unseen_embeddings(model, cfg["checkpoint"], meta["v_range"], config_seed(cfg))
        return model

    def param_groups(self, model, cfg, ds_config):
        op = ds_config.get("optimizer", {}).get("params", {})
        wd = op.get("weight_decay", 0.01)
        lr_mul = float(cfg.get("lr_mul", 1.0))
        heads = self.head_prefixes if lr_mul != 1.0 else ()
        base_lr = cfg.get("learning_rate", op.get("lr"))
        groups = _param_groups(model, wd, heads, lr_mul,
                               base_lr=float(base_lr) if base_lr is not None else None)
        if heads and not any(g["lr_mul"] != 1.0 for g in groups):
            raise ValueError(f"lr_mul {lr_mul}: no parameter of {type(model).__name__} is under "
                             f"the head prefixes {heads}")
        sched = ds_config.get("scheduler") or {}
        sp = sched.get("params", {})
        if sched.get("type") in ("WarmupLR", "WarmupDecayLR"):
            # DeepSpeed takes one value per parameter group: the head's are lr_mul times
            for key in ("warmup_max_lr", "warmup_min_lr"):
                v = sp.get(key, 0.0 if key == "warmup_min_lr" else base_lr)
                if v is None:
                    raise ValueError(f"DeepSpeed scheduler {sched['type']} lacks {key}")
                if isinstance(v, (list, tuple)):
                    if len(v) != len(groups):
                        raise ValueError(f"DeepSpeed scheduler {key} has {len(v)} values but "
                                         f"the model has {len(groups)} parameter groups")
                    continue
                sp[key] = [float(v) * g["lr_mul"] for g in groups]
        return groups

    # ---------------------------------------------------------------- training
    @abc.abstractmethod
    def train_loader(self, cfg, rank, world_size, accum_steps):
        """``.next() -> (name, batch)``, ``.state_dict()``, ``.load_state_dict()``."""

    @abc.abstractmethod
    def val_loaders(self, cfg, rank, world_size) -> Dict[str, Any]:
        """``{split: loader}`` for :meth:`validate`."""

    @abc.abstractmethod
    def compute_loss(self, engine, name, batch, cfg):
        """``(loss, extra logs)`` of a training batch (the original script's reduction)."""

    @abc.abstractmethod
    def validate(self, engine, val_loaders, ctx: RunContext) -> Dict[str, float]:
        """``{"<split>/<metric>": value}``; writes the split's result files on rank 0."""

    def blank_model(self, cfg: Dict[str, Any]) -> torch.nn.Module:
        """:meth:`make_model` with random weights that the caller replaces next (inference,
        export): built without the "randomly initialised" notice."""
        with weights_loaded_next():
            return self.make_model(cfg)

    # ---------------------------------------------------------------- export
    def model_for_checkpoint(self, cfg: Dict[str, Any], ckpt_dir: str) -> torch.nn.Module:
        """The (random) model whose keys a checkpoint of this task in ``ckpt_dir`` holds."""
        return self.blank_model(cfg)

    def check_state_dict(self, sd: Dict[str, torch.Tensor], ckpt_dir: str) -> None:
        """When the run's ``train_config.json`` sits beside ``ckpt_dir``: ``sd`` must have
        exactly the keys and shapes of that run's task model (the original's keys)."""
        cfg = run_config(ckpt_dir)
        if cfg is None:
            return
        self.check_config(cfg)
        model = self.model_for_checkpoint(cfg, ckpt_dir)
        try:
            check_keys(model, sd, f"{ckpt_dir}: the weights", shapes=True, limit=6)
        except ValueError as e:
            raise ValueError(f"{e} (the run's config; wrong --task?)") from None

    # ---------------------------------------------------------------- inference
    @abc.abstractmethod
    def add_infer_args(self, parser) -> None:
        """The task's own options of ``python -m uniter_fast.infer``."""

    def infer_config(self, cfg: Dict[str, Any], args) -> None:
        """Apply the task's inference options to the run's config (in place)."""

    @abc.abstractmethod
    def infer(self, args, cfg: Dict[str, Any], source, device: torch.device) -> Dict[str, Any]:
        """Run inference on ``args.txt_db`` / ``args.img_db`` with the weights of
        ``source`` (:class:`~uniter_fast.tasks.inference.CheckpointSource`); write the
        original's result files; return the summary printed as JSON."""

    # ---------------------------------------------------------------- predict
    #: the text fields of a ``python -m uniter_fast.predict`` request: name -> (kind,
    #: required, help); kind ``"text"`` (one string) or ``"texts"`` (one or more: the option
    #: repeated, a JSON list); empty: the task has no predict
    predict_fields: Dict[str, Tuple[str, bool, str]] = {}
    #: image files per request (NLVR2: the left and the right image)
    predict_images: int = 1

    def add_predict_args(self, parser) -> None:
        """The task's own options of ``python -m uniter_fast.predict``: one per field of
        :attr:`predict_fields` (tasks add the inference options their config reads)."""
        for name, (kind, _, help_) in self.predict_fields.items():
            parser.add_argument(f"--{name}", action="append" if kind == "texts" else "store",
                                default=None, help=help_)

    def predict_model(self, args, cfg: Dict[str, Any], source) -> torch.nn.Module:
        """The task model with the weights of ``source``, loaded as :meth:`infer` loads
        them (``args``: the task's options of :meth:`add_predict_args`)."""
        return load_strict(self.blank_model(cfg), load_weights(source), source.where, cfg)

    def predict_requests(self, model, requests: List[Dict[str, Any]], ctx) -> List[Dict[str, Any]]:
        """The answers (JSON objects: ``answer``, ``score``, ``top``, ...) of ``requests``
        (each: ``id``, ``where``, ``images`` (the images' features,
        :class:`uniter_fast.predict.ImageFeatures`) and the fields of :attr:`predict_fields`),
        batched with the task's own collate; ``ctx``: :class:`uniter_fast.predict.
        PredictContext` (tokens, image inputs, batches, the model call)."""
        raise ValueError(f"task {self.name} has no predict (python -m uniter_fast.predict)")

    def predict_alignment(self, request: Dict[str, Any], answer: Dict[str, Any], ctx):
        """What the word-region alignment of a request is computed on: ``(batch, words,
        regions)``, a collated batch whose every row holds the same sentence, the sentence's
        words as ``(word, first token, end token)`` positions in a row's text, and per row
        its regions as ``(image index, region index)``."""
        raise ValueError(f"task {self.name} has no word-region alignment")

    def predict_picture(self, request: Dict[str, Any], answer: Dict[str, Any]) -> Dict[str, Any]:
        """What a picture of an answer shows beside the image(s): ``title`` (lines),
        ``ranked`` (``(label, score)`` lines, best first), ``highlight`` (``(image,
        region, label)``: the chosen region first)."""
        return {"title": [], "ranked": [], "highlight": []}

    # ---------------------------------------------------------------- preprocessing
    def add_prepro_args(self, parser) -> None:
        """The task's own options of ``python -m uniter_fast.prepro``."""

    def prepro(self, files: List[str], fmt: Optional[str], args, ctx):
        """Text-db examples of the annotation ``files`` in format ``fmt`` (one of
        :attr:`prepro_formats`; None: told from the files), with the options ``args`` and
        the shared pieces ``ctx`` (:class:`~uniter_fast.prepro.PreproContext`: tokenizer,
        bad-input reports, image db); returns a :class:`~uniter_fast.prepro.Prepared`."""
        raise ValueError(f"task {self.name} has no annotation preprocessing "
                         "(python -m uniter_fast.prepro)")


def task_checkpoint_from_state_dict(task: FinetuneTask, pt_path: str, ckpt_dir: str,
                                    config: Optional[str] = None,
                                    deepspeed_config: Optional[str] = None) -> str:
    """A world-size-1 DeepSpeed checkpoint (tag ``global_step0``) of ``task``'s model
    holding the weights of ``pt_path`` (every key must match), built as ``finetune.py``
    builds it from the training config ``config`` (default: the task's synthetic one);
    continue it with ``finetune.py --task ... --output_dir <parent of ckpt_dir> --resume``."""
    from ..training.config import (
        build_arg_parser,
        fp32_if_bf16_emulated,
        from_pt_argv,
        load_configs,
    )
    from ..training.distributed import init_distributed
    from ..training.engine import create_engine
    p = build_arg_parser(DESCRIPTION, default_config(task.name), CLI_OVERRIDES)
    args = p.parse_args(from_pt_argv(ckpt_dir, config, deepspeed_config))
    cfg, ds = load_configs(args, required=task.required_keys, known_keys=task.known_keys)
    # the precision a new fine-tuning run would train in (fp32 where bf16 is emulated); in
    # bf16/fp16 DeepSpeed builds the fp32 masters from the half-precision module, so the
    # weights come back rounded to it
    fp32_if_bf16_emulated(ds, args, "export")
    task.configure(cfg, ds, args)
    cfg["checkpoint"] = None
    ckpt_lib.check_new_checkpoint_dir(ckpt_dir)
    init_distributed()
    import torch.distributed as dist
    if dist.get_world_size() != 1:
        raise ValueError("from-pt runs in a single process")
    model = task.blank_model(cfg)
    sd = load_state_dict_file(pt_path)
    check_keys(model, sd, f"the weights of {pt_path}")
    model.load_state_dict(sd, strict=True)
    groups = task.param_groups(model, cfg, ds)
    names = ckpt_lib.param_group_names(model, groups)
    engine = create_engine(model, groups, ds)
    settings = ckpt_lib.run_settings(engine, 1)
    os.makedirs(ckpt_dir, exist_ok=True)
    task.write_run_files(cfg, ckpt_dir)
    return ckpt_lib.save(engine, ckpt_dir, 0, {"global_step": 0, "data": None, "rng": None,
                                               "task": task.name, "settings": settings,
                                               "param_group_names": names},
                         settings=settings)
