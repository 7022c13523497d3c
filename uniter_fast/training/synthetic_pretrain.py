"""The one-time synthetic pretraining run that fine-tuning starts from.

A fine-tuning config with ``"checkpoint": "synthetic:pretrain"`` starts from a pretraining
run on the synthetic captions (:func:`ensure_synthetic_pretrain`), made once by the
pretraining command in a child process and cached under ``$UNITER_FAST_CACHE``; its
``synthetic_pretrain`` section names the pretraining config (default the packaged
``pretrain-synthetic-tiny``, the main command's default run) and may shorten it.  The
synthetic fine-tuning data lives in the same world (:func:`world_spec`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import config_path
from ..constants import STOP_SIGNALS
from ..data.build import resolve_path
from ..data.db import TxtTokLmdb
from ..data.synthetic import FORMAT_VERSION, SyntheticSpec, build_cached_dir, cache_root
from ..export import to_pt
from .config import read_json

__all__ = ["SYNTHETIC_PRETRAIN", "TRAIN_LOG_FILE", "TEXT_TOKENS_FILE", "world_spec",
           "ensure_synthetic_pretrain", "fresh_unseen_embeddings"]

#: the ``checkpoint`` value meaning "the cached synthetic pretraining run"
SYNTHETIC_PRETRAIN = "synthetic:pretrain"
#: bump when the cached pretraining run's recipe changes (part of its cache key)
PRETRAIN_CACHE_VERSION = 3
#: the cached pretraining run's standard output
TRAIN_LOG_FILE = "train_log.txt"
#: written beside a cached pretraining run: the token ids its training texts contain
TEXT_TOKENS_FILE = "text_tokens.json"


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


def _text_tokens(pre_cfg: Dict[str, Any]) -> List[int]:
    """Sorted token ids occurring in a pretraining config's training text dbs."""
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


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopForwarding:
    """While the pretraining child runs: a stop signal (SIGINT, SIGTERM) raises
    :class:`_Stopped` here (first) and is passed on to the child (after
    ``forward_only``), so neither process is left behind; the old handlers come back after."""

    def __init__(self):
        self.child: Optional[subprocess.Popen] = None
        self.forward_only = False
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.forward_only:
            if self.child is not None and self.child.poll() is None:
                self.child.send_signal(signum)
            return
        raise _Stopped(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


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

    def build(tmp: str) -> None:
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
        with open(os.path.join(tmp, TRAIN_LOG_FILE), "w") as log, _StopForwarding() as stop:
            # the run's synthetic data in the same cache as its result
            proc = subprocess.Popen(cmd, env=dict(_clean_env(), PYTHONUNBUFFERED="1",
                                                  UNITER_FAST_CACHE=root),
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
            stop.child = proc
            try:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                proc.stdout.close()
                proc.wait()
            except _Stopped as e:
                # SIGINT/SIGTERM here: the child gets it too (it saves and exits), nothing is
                # left running, the temporary directory goes (build_cached_dir), and this
                # process exits with the signal's status
                stop.forward_only = True
                proc.send_signal(e.signum)
                for line in proc.stdout:         # drained: the child never blocks on it
                    sys.stdout.write(line)
                    log.write(line)
                proc.wait()
                print(f"[finetune] {signal.Signals(e.signum).name}: stopped the synthetic "
                      "pretraining run (nothing cached)", file=sys.stderr, flush=True)
                raise SystemExit(128 + e.signum) from None
        sys.stdout.flush()
        if proc.returncode != 0:
            raise RuntimeError(f"the synthetic pretraining run failed (exit {proc.returncode}): "
                               f"{' '.join(cmd)}; its output is above")
        to_pt(os.path.join(run, "ckpt"), os.path.join(tmp, "uniter.pt"))
        with open(os.path.join(tmp, TEXT_TOKENS_FILE), "w") as f:
            json.dump({"seen": _text_tokens(pre)}, f)
        for f in ("metrics.jsonl", "train_config.json", "ds_config.json"):
            if os.path.exists(os.path.join(run, f)):
                shutil.copy(os.path.join(run, f), os.path.join(tmp, f))
        shutil.rmtree(run, ignore_errors=True)

    build_cached_dir(final, pt, build)
    return pt
