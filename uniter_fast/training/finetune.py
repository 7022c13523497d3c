"""Fine-tuning (VQA, VE, NLVR2) as :class:`~uniter_fast.training.task.TrainTask`\\ s.

Each task adds its model, datasets, loss reduction, metric and result files to
the shared :class:`~uniter_fast.training.loop.Trainer` (same DeepSpeed engine,
progress bar, ``metrics.jsonl``, checkpoints and ``--resume`` as pretraining).

Training configs are the original UNITER's (``config/train-vqa-base-4gpu.json``,
``train-ve-base-2gpu.json``, ``train-nlvr2-base-1gpu.json``) unchanged but for
paths: ``train_txt_dbs``/``train_img_dbs`` (lists; VE/NLVR2 write
``train_txt_db``/``train_img_db``), ``val_txt_db``/``val_img_db``,
``test_txt_db``/``test_img_db`` (validated too, as the original VE/NLVR2 scripts
do), ``checkpoint``, ``model_config``, ``lr_mul`` (the head's parameter groups get
``learning_rate * lr_mul`` through DeepSpeed: per-group ``warmup_max_lr`` of
``WarmupDecayLR``), ``optim`` (``adamw``/``adam``), ``betas``, ``weight_decay``,
``grad_norm``, ``warmup_steps``, ``num_train_steps``, ``gradient_accumulation_steps``,
``model`` (NLVR2: ``paired``, ``triplet``, ``paired-attn``), ``use_img_type``,
``train_batch_size``/``val_batch_size`` (tokens), ``conf_th``/``max_bb``/``min_bb``/
``num_bb``, ``compressed_db`` (absent: whichever image db layout exists),
``max_txt_len``, ``dropout``, ``seed``, ``n_workers``, ``pin_mem``.  ``fp16`` is read
but the precision is the DeepSpeed config's (``--precision``).  Keys neither the
original nor this trainer knows are reported (:attr:`FinetuneTask.known_keys`).

Built-in synthetic data: a db path ``synthetic-<task>:train`` / ``:val`` / ``:img``
is the task's synthetic dataset (:mod:`uniter_fast.data.synthetic_tasks`,
generated on first use from the config's ``synthetic_task`` section), and
``"checkpoint": "synthetic:pretrain"`` a pretraining run on the synthetic
captions made once and cached (:func:`ensure_synthetic_pretrain`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import CONFIG_DIR, config_path
from ..data.db import DetectFeatLmdb, TxtTokLmdb, img_db_name
from ..data.loader import ConcatDatasetWithLens, MetaLoader, TaskLoader
from ..data.sampler import TokenBucketSampler
from ..evaluation import answer_scores, nlvr2_consistency
from .config import OVERRIDES, read_json
from .engine import param_groups as _param_groups
from .pretrain import IMG_DIM, check_text_fits, load_model_config, set_dropout
from .task import RunContext, TrainTask
from .validation import reduce_sums, val_batches

__all__ = ["TASK_NAMES", "NLVR2_MODELS", "DESCRIPTION", "FINETUNE_OVERRIDES", "ORIGINAL_KEYS",
           "FinetuneTask", "VqaTask", "VeTask", "Nlvr2Task", "make_task", "default_config",
           "normalize_config", "build_finetune_model", "ensure_synthetic_pretrain",
           "world_spec", "resolve_synthetic", "img_db_for", "SYNTHETIC_PRETRAIN",
           "fresh_unseen_embeddings", "check_task_state_dict", "checkpoint_from_state_dict",
           "BUCKET_SIZE"]

DESCRIPTION = "UNITER fine-tuning (VQA, VE, NLVR2) under DeepSpeed."
#: fine-tuning part 2 (retrieval, referring expressions, VCR): :mod:`.finetune2`
PART2_TASK_NAMES = ("itm", "itm-hn", "re", "vcr")
TASK_NAMES = ("vqa", "ve", "nlvr2") + PART2_TASK_NAMES
NLVR2_MODELS = ("paired", "triplet", "paired-attn")
#: UNITER's ``utils/const.py`` BUCKET_SIZE
BUCKET_SIZE = 8192
#: the ``checkpoint`` value meaning "the cached synthetic pretraining run"
SYNTHETIC_PRETRAIN = "synthetic:pretrain"
#: bump when the cached pretraining run's recipe changes (part of its cache key)
PRETRAIN_CACHE_VERSION = 3
#: the cached pretraining run's standard output
TRAIN_LOG_FILE = "train_log.txt"
#: written beside a cached pretraining run: the token ids its training texts contain
TEXT_TOKENS_FILE = "text_tokens.json"

#: every key the original fine-tuning scripts (train_vqa.py, train_ve.py, train_nlvr2.py)
#: read from a training config
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


def default_config(task: str) -> str:
    return os.path.join(CONFIG_DIR, f"finetune-{task}-synthetic-tiny.json")


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


def normalize_config(task: str, cfg: Dict[str, Any]) -> None:
    """Check and complete an original-format fine-tuning config in place.

    Single-db keys become lists (``train_txt_dbs``, ``train_img_dbs``); defaults of
    the original scripts are filled in (``lr_mul`` 10 for VQA, 1 otherwise;
    NLVR2 ``model`` "paired", ``use_img_type`` False: the original's argparse
    defaults); wrong combinations raise ``ValueError`` naming the keys.
    """
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
        cfg["lr_mul"] = 10.0 if task == "vqa" else 1.0
    if float(cfg["lr_mul"]) <= 0:
        raise ValueError(f"training config lr_mul must be > 0, got {cfg['lr_mul']}")
    optim = cfg.get("optim", "adamw")
    if optim not in ("adamw", "adam"):
        raise ValueError(f"training config optim must be 'adamw' or 'adam' (DeepSpeed's "
                         f"AdamW/Adam on torch.optim), got {optim!r}")
    if task == "nlvr2":
        cfg.setdefault("model", "paired")
        if cfg["model"] not in NLVR2_MODELS:
            raise ValueError(f"training config model must be one of {NLVR2_MODELS}, got "
                             f"{cfg['model']!r}")
        cfg["use_img_type"] = bool(cfg.get("use_img_type", False))
    elif cfg.get("model") is not None:
        raise ValueError(f"training config key 'model' ({cfg['model']!r}) selects the NLVR2 "
                         f"variant; task {task} has none")
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


# ----------------------------------------------------------------------------- synthetic data

_SYNTH_TASK_PREFIX = "synthetic-"


def _pretrain_section(cfg: Dict[str, Any]) -> Tuple[str, Dict[str, Any], int]:
    """(pretraining config path, its JSON, steps) of the config's ``synthetic_pretrain``."""
    sec = dict(cfg.get("synthetic_pretrain") or {})
    unknown = set(sec) - {"config", "num_train_steps"}
    if unknown:
        raise ValueError(f"training config synthetic_pretrain: unknown keys {sorted(unknown)} "
                         "(known: config, num_train_steps)")
    name = sec.get("config", "pretrain-synthetic-tiny")
    path = name if os.path.exists(name) else config_path(name)
    pre = read_json(path, "pretraining config")
    steps = int(sec.get("num_train_steps", pre["num_train_steps"]))
    if steps < 1:
        raise ValueError(f"synthetic_pretrain num_train_steps must be >= 1, got {steps}")
    return path, pre, steps


def world_spec(cfg: Dict[str, Any]):
    """The synthetic world (:class:`SyntheticSpec`) of the pretraining config named by
    ``synthetic_pretrain`` (as pretraining builds it), with this config's box rule."""
    from ..data.synthetic import SyntheticSpec
    _, pre, _ = _pretrain_section(cfg)
    kw = dict(pre.get("synthetic") or {})
    for k in ("conf_th", "max_bb", "min_bb"):
        if k in cfg:
            kw[k] = cfg[k]
        elif k in pre:
            kw.setdefault(k, pre[k])
    try:
        return SyntheticSpec(**kw)
    except TypeError as e:
        raise ValueError(f"bad 'synthetic' section in the pretraining config: {e}") from None


def _task_spec(task: str, cfg: Dict[str, Any]):
    from ..data.synthetic_tasks import TaskSpec
    kw = dict(cfg.get("synthetic_task") or {})
    if kw.get("task", task) != task:
        raise ValueError(f"synthetic_task.task is {kw['task']!r} but this run is {task!r}")
    kw["task"] = task
    try:
        return TaskSpec(**kw)
    except TypeError as e:
        raise ValueError(f"bad 'synthetic_task' section in the training config: {e}") from None


def resolve_synthetic(path: str, task: str, cfg: Dict[str, Any]) -> str:
    """A db path, with ``synthetic-<task>:{train,val,img}`` made real (generated on first use)."""
    if not isinstance(path, str) or not path.startswith(_SYNTH_TASK_PREFIX) or ":" not in path:
        return path
    name, part = path[len(_SYNTH_TASK_PREFIX):].split(":", 1)
    if name != task:
        raise ValueError(f"{path!r} is a synthetic {name} db; this run fine-tunes {task}")
    if part not in ("train", "val", "img"):
        raise ValueError(f"unknown synthetic db {path!r}; use synthetic-{task}:train, :val or "
                         ":img")
    from ..data.synthetic_tasks import ensure_task_dbs
    return ensure_task_dbs(_task_spec(task, cfg), world_spec(cfg))[part]


def _text_tokens(pre_cfg: Dict[str, Any]) -> List[int]:
    """Sorted token ids occurring in a pretraining config's training text dbs."""
    from ..data.build import resolve_path
    seen = set()
    for d in pre_cfg.get("train_datasets") or []:
        for db in d["db"]:
            txt = TxtTokLmdb(resolve_path(db, pre_cfg), -1)
            for i in txt.id2len:
                seen.update(txt[i]["input_ids"])
    return sorted(int(t) for t in seen)


def fresh_unseen_embeddings(model, checkpoint: Optional[str], v_range: Sequence[int],
                            seed: int) -> List[int]:
    """Give fresh random embeddings to the words of ``v_range`` that the synthetic
    pretraining run behind ``checkpoint`` never saw (its :data:`TEXT_TOKENS_FILE`; other
    checkpoints are left alone).  Returns the re-initialised ids.

    Why: with the MLM decoder tied to the word embeddings, pretraining pushes every
    token that never occurs in its texts the same way, so they end up almost equal
    (cosine ~0.9 on the synthetic run): the fine-tuning texts' new words ("how",
    "many", "?", ...) would start indistinguishable.  The new rows are drawn from
    N(0, std of the seen rows), seeded by ``seed``.  (Real UNITER checkpoints saw the
    whole BERT vocabulary: the case does not arise.)
    """
    if not checkpoint:
        return []
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), TEXT_TOKENS_FILE)
    if not os.path.exists(path):
        return []
    seen = set(read_json(path, "pretraining text tokens")["seen"])
    emb = model.uniter.embeddings.word_embeddings.weight
    lo, hi = int(v_range[0]), min(int(v_range[1]), emb.size(0))
    unseen = [i for i in range(lo, hi) if i not in seen]
    known = [i for i in sorted(seen) if i < emb.size(0)]
    if not unseen or not known:
        return []
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        std = float(emb[known].float().std())
        emb[unseen] = (torch.randn(len(unseen), emb.size(1), generator=g) * std).to(emb.dtype)
    print(f"[finetune] fresh embeddings for {len(unseen)} words the synthetic pretraining "
          f"never saw (ids {unseen[0]}..{unseen[-1]})", flush=True)
    return unseen


def _clean_env() -> Dict[str, str]:
    """This environment without the launcher's distributed variables (a child process
    then runs as its own single-process job)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE",
            "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop}


def ensure_synthetic_pretrain(cfg: Dict[str, Any], ds_config_path: str,
                              precision: Optional[str] = None,
                              cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """Path of the plain state dict (``uniter.pt``) of a pretraining run on the synthetic
    captions, made once and cached.

    The run is ``python -m uniter_fast.train`` (the pretraining Trainer, as a separate
    single-process job) with the pretraining config named by ``synthetic_pretrain``
    (default the packaged ``pretrain-synthetic-tiny``), ``num_train_steps`` from that
    section, the DeepSpeed config ``ds_config_path`` and ``--precision precision``
    (None: the DeepSpeed config's); it is exported with
    :func:`uniter_fast.export.to_pt`.  The cache key covers both configs, so changing
    either makes a new run.  Written into a temporary directory and renamed into
    ``$UNITER_FAST_CACHE/pretrain-<name>-<key>/`` when complete, with the run's
    ``metrics.jsonl``, configs and standard output (``train_log.txt``).  Its validation and
    checkpoint steps are the config's, so with the default config it is the default
    pretraining run (the main command's).
    """
    from ..data.synthetic import FORMAT_VERSION, cache_root
    pre_path, pre, steps = _pretrain_section(cfg)
    pre = dict(pre, num_train_steps=steps, checkpoint=None)
    pre["warmup_steps"] = min(int(pre.get("warmup_steps", 0)), steps)
    # validation and checkpoints as the config says (with the default config this run is
    # the default pretraining run; tests/test_convergence.py checks it), but at least at the end
    for k in ("save_steps", "valid_steps"):
        pre[k] = min(int(pre.get(k) or steps), steps)
    ds = read_json(ds_config_path, "DeepSpeed config")
    blob = json.dumps({"v": PRETRAIN_CACHE_VERSION, "synthetic": FORMAT_VERSION,
                       "cfg": {k: v for k, v in pre.items() if k != "output_dir"}, "ds": ds,
                       "precision": precision},
                      sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:12]
    root = cache_dir or cache_root()
    name = os.path.splitext(os.path.basename(pre_path))[0]
    final = os.path.join(root, f"{name}-{key}")
    pt = os.path.join(final, "uniter.pt")
    if os.path.exists(pt):
        return pt
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=root)
    try:
        run = os.path.join(tmp, "run")
        pre["output_dir"] = run
        cfg_file = os.path.join(tmp, "pretrain_config.json")
        with open(cfg_file, "w") as f:
            json.dump(pre, f, indent=1)
        print(f"[finetune] no cached synthetic pretraining run ({final}); pretraining the "
              f"{pre.get('model_config')} model once for {steps} steps", flush=True)
        cmd = [sys.executable, "-m", "uniter_fast.train", "--config", cfg_file,
               "--deepspeed_config", os.path.abspath(ds_config_path)]
        if precision:
            cmd += ["--precision", precision]
        if not progress:
            cmd += ["--no_progress"]
        # its standard output is shown and kept beside the run (train_log.txt)
        with open(os.path.join(tmp, TRAIN_LOG_FILE), "w") as log:
            # the run's synthetic data in the same cache as its result
            proc = subprocess.Popen(cmd, env=dict(_clean_env(), PYTHONUNBUFFERED="1",
                                                  UNITER_FAST_CACHE=root),
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.stdout.close()
            proc.wait()
        sys.stdout.flush()
        if proc.returncode != 0:
            raise RuntimeError(f"the synthetic pretraining run failed (exit {proc.returncode}): "
                               f"{' '.join(cmd)}; its output is above")
        from ..export import to_pt
        to_pt(os.path.join(run, "ckpt"), os.path.join(tmp, "uniter.pt"))
        with open(os.path.join(tmp, TEXT_TOKENS_FILE), "w") as f:
            json.dump({"seen": _text_tokens(pre)}, f)
        for f in ("metrics.jsonl", "train_config.json", "ds_config.json"):
            if os.path.exists(os.path.join(run, f)):
                shutil.copy(os.path.join(run, f), os.path.join(tmp, f))
        shutil.rmtree(run, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(pt):       # not a concurrent winner: a real failure
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return pt


# ----------------------------------------------------------------------------- data

def img_db_for(path: str, cfg: Dict[str, Any]) -> DetectFeatLmdb:
    """The image db at ``path`` with the config's box rule; ``compressed_db`` absent means
    whichever layout the directory holds (compressed first)."""
    conf_th, max_bb = cfg.get("conf_th", 0.2), cfg.get("max_bb", 100)
    min_bb, num_bb = cfg.get("min_bb", 10), cfg.get("num_bb", 36)
    compress = cfg.get("compressed_db")
    if compress is None:
        compress = os.path.isdir(os.path.join(path, img_db_name(conf_th, max_bb, min_bb, num_bb,
                                                                True)))
    return DetectFeatLmdb(path, conf_th, max_bb, min_bb, num_bb, bool(compress),
                          cfg.get("img_dim"))


class _ImgDbs:
    def __init__(self, cfg):
        self.cfg, self.dbs = cfg, {}

    def __getitem__(self, path: str) -> DetectFeatLmdb:
        if path not in self.dbs:
            self.dbs[path] = img_db_for(path, self.cfg)
        return self.dbs[path]


# ----------------------------------------------------------------------------- model

def _model_class(task: str, cfg: Dict[str, Any]):
    if task == "vqa":
        from ..model.vqa import UniterForVisualQuestionAnswering
        return UniterForVisualQuestionAnswering
    if task == "ve":
        from ..model.ve import UniterForVisualEntailment
        return UniterForVisualEntailment
    from ..model import nlvr2
    return {"paired": nlvr2.UniterForNlvr2Paired, "triplet": nlvr2.UniterForNlvr2Triplet,
            "paired-attn": nlvr2.UniterForNlvr2PairedAttn}[cfg.get("model", "paired")]


def build_finetune_model(task: str, cfg: Dict[str, Any], state_dict=None,
                         num_answer: Optional[int] = None):
    """The task model as the original scripts build it: ``from_pretrained(model_config,
    state_dict, img_dim, ...)`` (``state_dict`` None: random weights), then for NLVR2
    ``init_type_embedding()``, then the config's dropout."""
    if task in PART2_TASK_NAMES:
        from .finetune2 import build_part2_model
        return build_part2_model(task, cfg, state_dict)
    config = load_model_config(cfg)
    kw: Dict[str, Any] = {"img_dim": int(cfg.get("img_dim") or IMG_DIM)}
    if task == "vqa":
        kw["num_answer"] = int(num_answer)
    cls = _model_class(task, cfg)
    model = cls.from_pretrained(config, state_dict, **kw)
    if task == "nlvr2":
        model.init_type_embedding()
    set_dropout(model, cfg.get("dropout"))
    return model


# ----------------------------------------------------------------------------- tasks

class FinetuneTask(TrainTask):
    """What VQA, VE and NLVR2 share: config handling, loaders, the head parameter groups,
    the loss reduction, validation over ``val`` (and ``test``) with result files."""

    name = "finetune"
    required_keys = ("output_dir", "num_train_steps", "train_batch_size", "model_config")
    known_keys = ORIGINAL_KEYS | OWN_KEYS
    #: parameter-name prefixes of the task head (the ``lr_mul`` groups)
    head_prefixes: Tuple[str, ...] = ()

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
        normalize_config(self.name, cfg)
        _apply_optim(cfg, ds_config)
        self.ds_config_path = getattr(args, "deepspeed_config", None) or "ds.json"
        self._args = args    # its precision is final only after the Trainer's setup
        self.progress = not getattr(args, "no_progress", False)

    def _resolve(self, cfg: Dict[str, Any]) -> None:
        """Synthetic paths and checkpoint made real (generated on first use)."""
        t = self.name
        cfg["train_txt_dbs"] = [resolve_synthetic(p, t, cfg) for p in cfg["train_txt_dbs"]]
        cfg["train_img_dbs"] = [resolve_synthetic(p, t, cfg) for p in cfg["train_img_dbs"]]
        for k in ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db"):
            if cfg.get(k) is not None:
                cfg[k] = resolve_synthetic(cfg[k], t, cfg)
        if cfg.get("checkpoint") == SYNTHETIC_PRETRAIN:
            cfg["checkpoint"] = ensure_synthetic_pretrain(cfg, self.ds_config_path,
                                                          self.precision,
                                                          progress=self.progress)

    def prepare_data(self, cfg, rank):
        self._resolve(cfg)
        metas = [TxtTokLmdb(p, -1).meta for p in cfg["train_txt_dbs"] +
                 [cfg[k] for k in ("val_txt_db", "test_txt_db") if cfg.get(k)]]
        for m, p in zip(metas[1:], cfg["train_txt_dbs"][1:] + ["val/test"]):
            if m.get("bert") != metas[0].get("bert"):
                raise ValueError(f"text dbs use different tokenizers: {m.get('bert')!r} vs "
                                 f"{metas[0].get('bert')!r}")
        self._meta = metas[0]
        if rank == 0:
            self.write_run_files(cfg)

    def write_run_files(self, cfg) -> None:
        """Files the original writes next to the checkpoints (e.g. VQA's ans2label.json)."""

    def data_meta(self, cfg):
        return self._meta

    def dataset(self, txt_db, img_db, train: bool, rank: int, world_size: int, seed: int):
        raise NotImplementedError

    def collate(self, train: bool):
        raise NotImplementedError

    def _datasets(self, cfg, txts: Sequence[str], imgs: Sequence[str], train: bool, rank: int,
                  world: int):
        dbs = _ImgDbs(cfg)
        max_len = int(cfg.get("max_txt_len", 60)) if train else -1
        parts = [self.dataset(TxtTokLmdb(t, max_len), dbs[i], train, rank, world,
                              int(cfg.get("seed", 42))) for t, i in zip(txts, imgs)]
        return parts[0] if len(parts) == 1 else ConcatDatasetWithLens(parts)

    def train_loader(self, cfg, rank, world_size, accum_steps):
        ds = self._datasets(cfg, cfg["train_txt_dbs"], cfg["train_img_dbs"], True, rank,
                            world_size)
        seed = int(cfg.get("seed", 42))
        sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                     int(cfg["train_batch_size"]), droplast=True,
                                     seed=seed + 7919 * rank)
        loader = TaskLoader(ds, self.collate(True), sampler, int(cfg.get("n_workers", 0)),
                            bool(cfg.get("pin_mem", False)))
        return MetaLoader({self.name: (loader, 1)}, accum_steps=accum_steps, seed=seed)

    def val_loaders(self, cfg, rank, world_size):
        out = {}
        for split in ("val", "test"):
            if cfg.get(f"{split}_txt_db") is None:
                continue
            ds = self._datasets(cfg, [cfg[f"{split}_txt_db"]], [cfg[f"{split}_img_db"]], False,
                                rank, world_size)
            sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                         int(cfg.get("val_batch_size") or cfg["train_batch_size"]),
                                         droplast=False, seed=int(cfg.get("seed", 42)))
            out[split] = TaskLoader(ds, self.collate(False), sampler)
        return out

    # ---------------------------------------------------------------- model
    def num_answer(self, cfg) -> Optional[int]:
        return None

    def build_model(self, cfg, meta):
        config = load_model_config(cfg)
        check_text_fits(config, meta, cfg)
        state = None
        if cfg.get("checkpoint"):
            state = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        model = build_finetune_model(self.name, cfg, state, self.num_answer(cfg))
        if state is not None and meta.get("v_range"):
            fresh_unseen_embeddings(model, cfg["checkpoint"], meta["v_range"],
                                    int(cfg.get("seed", 42)))
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

    # ---------------------------------------------------------------- step
    def compute_loss(self, engine, name, batch, cfg):
        loss = engine(batch, compute_loss=True)
        return engine.module.reduce_loss(loss), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["targets"].size(0))

    # ---------------------------------------------------------------- validation
    def predict(self, logits: torch.Tensor) -> List[Any]:
        """Result-file answers of a batch of logits."""
        raise NotImplementedError

    def batch_metrics(self, logits, batch, sums) -> None:
        raise NotImplementedError

    def finish_metrics(self, sums, results, split) -> Dict[str, float]:
        return {}

    def validate(self, engine, val_loaders, ctx: RunContext):
        logs: Dict[str, float] = {}
        for split, loader in val_loaders.items():
            sums: Dict[str, float] = defaultdict(float)
            results: List[Tuple[str, Any, Any]] = []
            for b, real in val_batches(loader, ctx):
                qids = b.pop("qids")
                targets = b.get("targets")
                logits = engine(b, compute_loss=False).float()
                if not real:
                    continue
                preds = self.predict(logits)
                if targets is not None:
                    self.batch_metrics(logits, b, sums)
                results.extend(zip(qids, preds, _row_targets(targets, len(qids))))
            results = _gather(results, ctx.world_size)
            tot = _reduce(sums, ctx.world_size)
            logs.update(self.finish_metrics(tot, results, split))
            if ctx.rank == 0:
                self.write_results(os.path.join(ctx.output_dir, "results"), split, ctx.step,
                                   [(q, p) for q, p, _ in results])
        return logs

    def write_results(self, out_dir: str, split: str, step: int, results) -> str:
        raise NotImplementedError


def _row_targets(targets, n: int) -> List[Any]:
    if targets is None:
        return [None] * n
    if targets.dim() == 1:
        return [int(t) for t in targets.tolist()]
    return [None] * n


def _gather(results: List[Any], world_size: int) -> List[Any]:
    if world_size == 1:
        return results
    import torch.distributed as dist
    parts: List[Any] = [None] * world_size
    dist.all_gather_object(parts, results)
    return [r for p in parts for r in p]


def _reduce(sums: Dict[str, float], world_size: int) -> Dict[str, float]:
    # every rank reduces the same counters (a rank without labelled batches has none)
    return reduce_sums(sums, ("loss", "score", "correct", "n"), world_size)


class VqaTask(FinetuneTask):
    """VQA: BCE over the answer vocabulary (soft scores), score of the arg-max answer;
    result files ``results/results_{step}_all.json`` {question_id: answer} as the
    original's per-validation files (merged over ranks)."""

    name = "vqa"
    head_prefixes = ("vqa_output",)

    def ans2label(self, cfg) -> Dict[str, int]:
        from ..data.vqa import load_ans2label
        if not hasattr(self, "_ans2label"):
            self._ans2label = load_ans2label(cfg.get("ans2label"))
            self._label2ans = {v: k for k, v in self._ans2label.items()}
        return self._ans2label

    def num_answer(self, cfg):
        return len(self.ans2label(cfg))

    def write_run_files(self, cfg) -> None:
        path = os.path.join(cfg["output_dir"], "ckpt", "ans2label.json")
        with open(path, "w") as f:
            json.dump(self.ans2label(cfg), f)

    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        from ..data.vqa import VqaDataset, VqaEvalDataset
        cls = VqaDataset if train else VqaEvalDataset
        return cls(len(self._ans2label), txt_db, img_db, rank=rank, world_size=world_size,
                   seed=seed)

    def train_loader(self, cfg, rank, world_size, accum_steps):
        self.ans2label(cfg)
        return super().train_loader(cfg, rank, world_size, accum_steps)

    def collate(self, train):
        from ..data.vqa import vqa_collate, vqa_eval_collate
        return vqa_collate if train else vqa_eval_collate

    def predict(self, logits):
        return [self._label2ans[i] for i in logits.argmax(-1).tolist()]

    def batch_metrics(self, logits, b, sums):
        t = b["targets"].float()
        sums["loss"] += float(F.binary_cross_entropy_with_logits(logits, t, reduction="sum"))
        sums["score"] += float(answer_scores(logits, t).sum())
        sums["n"] += t.size(0)

    metric = "score"

    def finish_metrics(self, tot, results, split):
        if tot["n"] == 0:
            return {}
        return {f"{split}/loss": tot["loss"] / tot["n"],
                f"{split}/{self.metric}": tot["score"] / tot["n"]}

    def write_results(self, out_dir, split, step, results):
        os.makedirs(out_dir, exist_ok=True)
        prefix = "" if split == "val" else f"{split}_"
        path = os.path.join(out_dir, f"{prefix}results_{step}_all.json")
        _atomic_write(path, json.dumps({q: a for q, a in results}))
        return path


class VeTask(VqaTask):
    """VE: the VQA head and loss with 3 labels; accuracy; ``results/{split}_results_{step}_all.json``
    {id: contradiction/entailment/neutral} as the original's ``train_ve.py``."""

    name = "ve"
    metric = "acc"

    def ans2label(self, cfg):
        from ..model.ve import VE_ENT2IDX, VE_IDX2ENT
        self._ans2label, self._label2ans = dict(VE_ENT2IDX), dict(VE_IDX2ENT)
        return self._ans2label

    def num_answer(self, cfg):
        return None

    def write_run_files(self, cfg):
        pass

    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        from ..data.ve import VeDataset, VeEvalDataset
        cls = VeDataset if train else VeEvalDataset
        return cls(txt_db, img_db, rank=rank, world_size=world_size, seed=seed)

    def write_results(self, out_dir, split, step, results):
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{split}_results_{step}_all.json")
        _atomic_write(path, json.dumps({q: a for q, a in results}))
        return path


class Nlvr2Task(FinetuneTask):
    """NLVR2: cross-entropy over False/True; accuracy and consistency;
    ``results/{split}_results_{step}_all.csv`` lines ``identifier,True|False`` as the
    original's ``train_nlvr2.py`` / ``inf_nlvr2.py``."""

    name = "nlvr2"
    head_prefixes = ("nlvr2_output", "attn1", "attn2", "fc", "attn_pool")

    def dataset(self, txt_db, img_db, train, rank, world_size, seed):
        from ..data import nlvr2 as d
        paired = "paired" in self._variant
        cls = ((d.Nlvr2PairedDataset if train else d.Nlvr2PairedEvalDataset) if paired else
               (d.Nlvr2TripletDataset if train else d.Nlvr2TripletEvalDataset))
        return cls(txt_db, img_db, self._use_img_type, rank=rank, world_size=world_size,
                   seed=seed)

    def configure(self, cfg, ds_config, args):
        super().configure(cfg, ds_config, args)
        self._variant, self._use_img_type = cfg["model"], cfg["use_img_type"]

    def collate(self, train):
        from ..data import nlvr2 as d
        if "paired" in self._variant:
            return d.nlvr2_paired_collate if train else d.nlvr2_paired_eval_collate
        return d.nlvr2_triplet_collate if train else d.nlvr2_triplet_eval_collate

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
        _atomic_write(path, _csv(results))
        return path


def _csv(rows) -> str:
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for q, a in rows:
        w.writerow([q, a])
    return buf.getvalue()


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_TASKS = {"vqa": VqaTask, "ve": VeTask, "nlvr2": Nlvr2Task}


def make_task(name: str) -> FinetuneTask:
    if name in PART2_TASK_NAMES:
        from .finetune2 import make_task2
        return make_task2(name)
    if name not in _TASKS:
        raise ValueError(f"unknown fine-tuning task {name!r}; expected one of {TASK_NAMES}")
    return _TASKS[name]()



# ----------------------------------------------------------------------------- export

def _run_config(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir.rstrip("/"))),
                        "train_config.json")
    return read_json(path, "training config") if os.path.exists(path) else None


def _vqa_num_answer(cfg: Dict[str, Any], ckpt_dir: Optional[str] = None) -> int:
    from ..data.vqa import load_ans2label
    path = os.path.join(ckpt_dir, "ans2label.json") if ckpt_dir else None
    if path and os.path.exists(path):
        return len(load_ans2label(path))
    return len(load_ans2label(cfg.get("ans2label")))


def check_task_state_dict(task: str, sd: Dict[str, torch.Tensor], ckpt_dir: str) -> None:
    """When the run's ``train_config.json`` sits beside ``ckpt_dir``: ``sd`` must have
    exactly the keys and shapes of that run's task model (the original's keys)."""
    cfg = _run_config(ckpt_dir)
    if cfg is None:
        return
    model = build_finetune_model(task, cfg, None,
                                 _vqa_num_answer(cfg, ckpt_dir) if task == "vqa" else None)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{ckpt_dir}: the weights do not fit {type(model).__name__} of the "
                         f"run's config: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                         f"shape mismatch {bad[:6]} (wrong --task?)")


def checkpoint_from_state_dict(task_name: str, pt_path: str, ckpt_dir: str,
                               config: Optional[str] = None,
                               deepspeed_config: Optional[str] = None) -> str:
    """A world-size-1 DeepSpeed checkpoint (tag ``global_step0``) of a fine-tuning model
    holding the weights of ``pt_path`` (every key must match), built as ``finetune.py``
    builds it from the training config ``config`` (default: the task's synthetic one);
    continue it with ``finetune.py --task ... --output_dir <parent of ckpt_dir> --resume``."""
    from .. import checkpoint as ckpt_lib
    from .config import build_arg_parser, fp32_if_bf16_emulated, load_configs
    from .distributed import init_distributed
    from .engine import create_engine
    task = make_task(task_name)
    p = build_arg_parser(DESCRIPTION, default_config(task_name), CLI_OVERRIDES)
    argv = ["--output_dir", os.path.dirname(os.path.abspath(ckpt_dir.rstrip("/"))),
            "--num_train_steps", "1"]
    if config:
        argv += ["--config", config]
    if deepspeed_config:
        argv += ["--deepspeed_config", deepspeed_config]
    args = p.parse_args(argv)
    cfg, ds = load_configs(args, required=task.required_keys, known_keys=task.known_keys)
    # the precision a new fine-tuning run would train in (fp32 where bf16 is emulated); in
    # bf16/fp16 DeepSpeed builds the fp32 masters from the half-precision module, so the
    # weights come back rounded to it
    fp32_if_bf16_emulated(ds, args, "export")
    task.configure(cfg, ds, args)
    cfg["checkpoint"] = None
    tags = ckpt_lib.list_tags(ckpt_dir)
    if tags or os.path.exists(os.path.join(ckpt_dir, ckpt_lib.LATEST)):
        raise ValueError(f"{ckpt_dir} already holds a checkpoint ({tags[:4]}); choose a new "
                         "directory")
    init_distributed()
    import torch.distributed as dist
    if dist.get_world_size() != 1:
        raise ValueError("from-pt runs in a single process")
    num_answer = task.num_answer(cfg)
    model = build_finetune_model(task_name, cfg, None, num_answer)
    sd = torch.load(pt_path, map_location="cpu", weights_only=True)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(f"{pt_path} does not match {type(model).__name__}: missing "
                         f"{missing}, unexpected {unexpected}")
    model.load_state_dict(sd, strict=True)
    groups = task.param_groups(model, cfg, ds)
    names = ckpt_lib.param_group_names(model, groups)
    engine = create_engine(model, groups, ds)
    settings = ckpt_lib.run_settings(engine, 1)
    os.makedirs(ckpt_dir, exist_ok=True)
    if task_name == "vqa":
        with open(os.path.join(ckpt_dir, "ans2label.json"), "w") as f:
            json.dump(task.ans2label(cfg), f)
    return ckpt_lib.save(engine, ckpt_dir, 0, {"global_step": 0, "data": None, "rng": None,
                                               "task": task_name, "settings": settings,
                                               "param_group_names": names},
                         settings=settings)
