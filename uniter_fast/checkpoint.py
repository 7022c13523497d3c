"""Crash-safe, verified DeepSpeed checkpoints.

Saving (:func:`save`, every rank):

1. the tag directory is written by DeepSpeed's ``save_checkpoint`` with
   ``save_latest=False`` (DeepSpeed would otherwise write ``latest`` itself,
   possibly before every rank finished writing);
2. after a barrier every file of the tag is fsynced and checksummed (CRC-32,
   streamed; the files are split over the ranks) and rank 0 writes
   ``manifest.json`` (size + checksum of every file, and the run settings:
   ZeRO stage, precision, world size) atomically;
3. only then rank 0 replaces ``latest`` atomically (temp file, fsync,
   ``os.replace``, fsync of the directory).

A kill at any moment therefore leaves ``latest`` naming a complete, verified
checkpoint (or no ``latest`` at all); a partially written tag has no manifest,
is never referenced, and is removed when training saves that step again.  A
failed write (e.g. a full disk) raises :class:`CheckpointSaveError` naming the
tag, the free space and the intact tag ``latest`` still names.

Loading (:func:`load`): the manifest is verified first (sizes and checksums,
split over the ranks), then the stored settings are compared with the running
ones, then every ``.pt`` file of the tag passes a safe load (:func:`check_tag_safe`), and
only then DeepSpeed loads the tag.  A damaged tag stops with a :class:`CheckpointError`
naming the file and the newest intact tag.

Safe loading: a checkpoint directory never runs code.  DeepSpeed (``load_checkpoint``,
``zero_to_fp32``) unpickles its files with the full pickle machinery, which runs whatever a
planted payload asks for, and the manifest is no defence (its checksums can be rewritten).
So before anything unpickles a tag, each of its ``.pt`` files is loaded with
``weights_only=True`` (torch's restricted unpickler: tensors and plain containers) plus
exactly the globals in :data:`SAFE_GLOBALS`, what DeepSpeed and torch store in our
checkpoints; anything else is refused with :class:`UnsafeCheckpointError` naming the file
and the global.  ``--trust_checkpoint`` (:func:`trust_checkpoints`) skips the check for a
checkpoint the user made.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
import zipfile
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["CheckpointError", "CheckpointSaveError", "LATEST", "MANIFEST", "METRICS_FILE",
           "save", "load", "load_latest", "read_latest", "write_latest", "tag_for_step",
           "list_tags", "read_manifest", "verify_tag", "newest_intact_tag", "check_output_dir",
           "check_settings", "run_settings", "ds_settings", "stored_settings", "param_group_names", "checksum_file",
           "UnsafeCheckpointError", "SAFE_GLOBALS", "TRUST_FLAG", "safe_load", "check_file_safe",
           "check_tag_safe", "trust_checkpoints", "trusting", "trusted"]

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
METRICS_FILE = "metrics.jsonl"
CHECKSUM = "crc32"
_CHUNK = 4 << 20
SETTINGS_KEYS = ("zero_stage", "precision", "world_size")


class CheckpointError(ValueError):
    """A checkpoint (or output directory) that cannot be used as asked."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; ``latest`` still names the previous intact one."""


class UnsafeCheckpointError(CheckpointError):
    """A file that does not pass the safe load: it holds a global outside
    :data:`SAFE_GLOBALS` (loading it could run code), or it is no checkpoint file at all."""


# ----------------------------------------------------------------------------- names

def tag_for_step(step: int) -> str:
    return f"global_step{int(step)}"


def _step_of(tag: str) -> Optional[int]:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m.group(1)) if m else None


def list_tags(ckpt_dir: str) -> List[str]:
    """Tag directories in ``ckpt_dir``, newest first (by step, then by mtime)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, t))]

    def key(t):
        s = _step_of(t)
        return (s if s is not None else -1, os.path.getmtime(os.path.join(ckpt_dir, t)))
    return sorted(tags, key=key, reverse=True)


# ----------------------------------------------------------------------------- distributed

def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_gather(obj: Any) -> List[Any]:
    if not _dist() or _world() == 1:
        return [obj]
    out: List[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    if not _dist() or _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any(msgs: Sequence[Optional[str]], cls=None) -> None:
    """Every rank raises the first non-empty message of ``msgs`` (gathered)."""
    bad = [m for m in msgs if m]
    if bad:
        raise (cls or CheckpointError)(bad[0])


# ----------------------------------------------------------------------------- files

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def checksum_file(path: str, fsync: bool = False) -> Tuple[int, int]:
    """``(size, crc32)`` of a file, streamed in 4 MiB chunks; ``fsync`` flushes it to disk."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            crc = zlib.crc32(buf, crc)
            size += len(buf)
    return size, crc & 0xFFFFFFFF


def _tag_files(tag_dir: str) -> List[str]:
    """Every regular file of a tag (relative paths, sorted), the manifest excluded."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST + ".tmp"):
                out.append(rel)
    return sorted(out)


def write_latest(ckpt_dir: str, tag: str) -> None:
    """Atomically point ``ckpt_dir/latest`` at ``tag``."""
    _atomic_write(os.path.join(ckpt_dir, LATEST), tag)


def read_latest(ckpt_dir: str) -> Optional[str]:
    """The tag ``ckpt_dir/latest`` names; ``None`` without a ``latest`` file.

    Raises :class:`CheckpointError` naming the file when it does not hold the
    name of a tag directory (garbage, empty, a missing tag).
    """
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(4096)
    tags = list_tags(ckpt_dir)
    how = (f"tags present: {tags[:6]}; resume from one with --resume --resume_tag TAG "
           f"(or write its name into {path})" if tags else "no tag directory is present")
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a checkpoint tag name (binary data "
                              f"{raw[:12]!r}...); expected the name of a tag directory such "
                              f"as 'global_step1000' in {ckpt_dir}; {how}") from None
    if not tag or os.sep in tag or tag in (".", "..") or \
            not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(f"{path} names {tag[:80]!r}, which is not a checkpoint directory "
                              f"in {ckpt_dir}; {how}")
    return tag


# ----------------------------------------------------------------------------- manifests

def read_manifest(tag_dir: str) -> Optional[Dict[str, Any]]:
    """The tag's manifest, ``None`` when it has none; a corrupt one raises."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            man = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        raise CheckpointError(f"{path} is corrupt (no 'files' table)")
    return man


def _check_entries(tag_dir: str, entries: Iterable[Tuple[str, Dict[str, Any]]]) -> List[str]:
    problems = []
    for rel, want in entries:
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"file {path} is missing")
            continue
        size = os.path.getsize(path)
        if size != want.get("size"):
            problems.append(f"file {path} has {size} bytes, the manifest says {want.get('size')}"
                            " (truncated or overwritten)")
            continue
        if checksum_file(path)[1] != want.get(CHECKSUM):
            problems.append(f"file {path} does not match its {CHECKSUM} checksum (corrupted)")
    return problems


def verify_tag(tag_dir: str, share: Optional[Tuple[int, int]] = None) -> List[str]:
    """Problems of a tag (``[]``: intact).  ``share=(rank, world)`` checks only
    every ``world``-th file from ``rank`` on (the caller gathers the results)."""
    try:
        man = read_manifest(tag_dir)
    except CheckpointError as e:
        return [str(e)]
    if man is None:
        return [f"{tag_dir} has no {MANIFEST} (an interrupted save, or written by an older "
                "version)"]
    entries = sorted(man["files"].items())
    if share is not None:
        entries = entries[share[0]::share[1]]
    return _check_entries(tag_dir, entries)


def newest_intact_tag(ckpt_dir: str, before_step: Optional[int] = None,
                      exclude: Sequence[str] = ()) -> Optional[str]:
    """The newest tag whose manifest verifies (reads its files), optionally older than a step."""
    for t in list_tags(ckpt_dir):
        if t in exclude:
            continue
        s = _step_of(t)
        if before_step is not None and (s is None or s >= before_step):
            continue
        if not verify_tag(os.path.join(ckpt_dir, t)):
            return t
    return None


def _resume_hint(ckpt_dir: str, good: Optional[str]) -> str:
    if good is None:
        return (f"No intact checkpoint (one with a verified {MANIFEST}) is left in {ckpt_dir}: "
                "start a new run with another --output_dir.")
    return (f"The newest intact checkpoint is {good}: resume from it with --resume "
            f"--resume_tag {good} (training repeats the steps after it; 'latest' is then "
            "rewritten to name it).")


def _damage_message(ckpt_dir: str, tag: str, problems: Sequence[str]) -> str:
    good = newest_intact_tag(ckpt_dir, before_step=_step_of(tag), exclude=(tag,))
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4
                                       else "")
    return (f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged and was not loaded: {shown}. "
            + _resume_hint(ckpt_dir, good))


def _verify_collective(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    """Verify a tag on all ranks (files split over them); every rank raises on damage.
    Returns the manifest ({} for a legacy tag without one, which rank 0 warns about)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    rank, world = _rank(), _world()
    try:
        man = read_manifest(tag_dir)
        err = None
    except CheckpointError as e:
        man, err = None, str(e)
    problems = [] if (man is None or err) else verify_tag(tag_dir, share=(rank, world))
    gathered = _all_gather(problems)
    problems = sorted(p for ps in gathered for p in ps)
    if err:
        problems = [err]
    msg = None
    if problems and rank == 0:
        msg = _damage_message(ckpt_dir, tag, problems)
    msg = _from_rank0(msg)
    _raise_if_any([msg])
    if man is None:
        if rank == 0:
            print(f"[uniter_fast] warning: {tag_dir} has no {MANIFEST} (written by an older "
                  "version): loading it unverified", flush=True)
        return {}
    return man


# ----------------------------------------------------------------------------- settings

def run_settings(engine, world_size: Optional[int] = None) -> Dict[str, Any]:
    """What a checkpoint can only be resumed under: ZeRO stage, precision, world size."""
    if engine.bfloat16_enabled():
        precision = "bf16"
    elif engine.fp16_enabled():
        precision = "fp16"
    else:
        precision = "fp32"
    return {"zero_stage": int(engine.zero_optimization_stage()), "precision": precision,
            "world_size": int(world_size if world_size is not None else _world())}


def ds_settings(ds_config: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    """:func:`run_settings` as a DeepSpeed config asks for them (before the engine exists)."""
    def on(k):
        return bool((ds_config.get(k) or {}).get("enabled", False))
    precision = "bf16" if on("bf16") or on("bfloat16") else "fp16" if on("fp16") else "fp32"
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    return {"zero_stage": stage, "precision": precision, "world_size": int(world_size)}


def stored_settings(ckpt_dir: str, tag: str) -> Optional[Dict[str, Any]]:
    """The settings in a tag's manifest (None: no readable manifest)."""
    try:
        man = read_manifest(os.path.join(ckpt_dir, tag))
    except CheckpointError:
        return None
    return (man or {}).get("settings")


def check_settings(stored: Dict[str, Any], requested: Dict[str, Any], ckpt_dir: str,
                   tag: str) -> None:
    """Refuse to resume a checkpoint under other ZeRO stage / precision / world size."""
    diff = [k for k in SETTINGS_KEYS if k in stored and stored[k] != requested.get(k)]
    if not diff:
        return

    def fmt(d):
        return ", ".join(f"{k}={d.get(k)}" for k in SETTINGS_KEYS)
    flags = " ".join(f"--{k} {stored[k]}" for k in ("zero_stage", "precision") if k in diff)
    ws = f" on {stored['world_size']} processes" if "world_size" in diff else ""
    raise CheckpointError(
        f"checkpoint {os.path.join(ckpt_dir, tag)} was saved with {fmt(stored)}; this run has "
        f"{fmt(requested)} (different: {', '.join(diff)}). DeepSpeed cannot load its "
        f"optimizer state under other settings. Resume with the stored settings "
        f"({(flags + ws).strip()}), or export the weights (python -m uniter_fast.export to-pt "
        f"{ckpt_dir} model.pt --tag {tag}) and start a new run from them (\"checkpoint\": "
        "\"model.pt\" in the training config; optimizer state and data position start afresh).")


def param_group_names(model: torch.nn.Module, groups: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """Parameter names of each optimizer group, in order (lets export find the fp32
    master copy of each weight in a ZeRO-0 bf16/fp16 checkpoint)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in groups]


# ----------------------------------------------------------------------------- output dir

def _has_metrics(out_dir: str) -> bool:
    p = os.path.join(out_dir, METRICS_FILE)
    return os.path.isfile(p) and os.path.getsize(p) > 0


def check_output_dir(out_dir: str, resume: bool, resume_tag: Optional[str] = None
                     ) -> Optional[str]:
    """The tag to resume from (``None``: a fresh run), or :class:`CheckpointError`.

    Without ``resume`` an output dir holding any trace of a run (``ckpt/latest``,
    a checkpoint directory, a non-empty ``metrics.jsonl``) is refused.  With it,
    there must be something to resume: ``resume_tag``, else what ``latest``
    names; tag directories without ``latest`` are refused with the newest
    intact one named.  Reads only; safe to call on every rank.
    """
    ckpt_dir = os.path.join(out_dir, "ckpt")
    tags = list_tags(ckpt_dir)
    has_latest = os.path.exists(os.path.join(ckpt_dir, LATEST))
    if not resume and resume_tag is None:
        found = ([f"{ckpt_dir}/{LATEST}"] if has_latest else []) + \
                ([f"checkpoint directories {tags[:4]}"] if tags else []) + \
                ([os.path.join(out_dir, METRICS_FILE)] if _has_metrics(out_dir) else [])
        if found:
            raise CheckpointError(f"output dir {out_dir} already holds a run "
                                  f"({', '.join(found)}): pass --resume to continue it, or "
                                  "choose another --output_dir")
        return None
    if resume_tag is not None:
        if resume_tag not in tags:
            raise CheckpointError(f"--resume_tag {resume_tag}: no such checkpoint directory in "
                                  f"{ckpt_dir} (present: {tags[:8]})")
        return resume_tag
    if has_latest:
        return read_latest(ckpt_dir)
    if tags:
        raise CheckpointError(
            f"--resume: {ckpt_dir} has checkpoint directories {tags[:4]} but no '{LATEST}' "
            f"file ('latest' is written only after a checkpoint is complete and verified). "
            + _resume_hint(ckpt_dir, newest_intact_tag(ckpt_dir)))
    extra = (f" ({os.path.join(out_dir, METRICS_FILE)} exists: that run stopped before its "
             "first checkpoint; delete the directory or choose another --output_dir)"
             if _has_metrics(out_dir) else "; run without --resume to start a new run")
    raise CheckpointError(f"--resume: nothing to resume from: no checkpoint in {ckpt_dir}"
                          + extra)


# ----------------------------------------------------------------------------- save

def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _space_check(ckpt_dir: str) -> Optional[str]:
    """A message when the filesystem clearly lacks room for one more checkpoint
    (estimated from the size of the one ``latest`` names)."""
    try:
        prev = read_latest(ckpt_dir)
        man = read_manifest(os.path.join(ckpt_dir, prev)) if prev else None
    except CheckpointError:
        return None
    if not man:
        return None
    need = sum(int(f.get("size", 0)) for f in man["files"].values())
    free = _free_bytes(ckpt_dir)
    if free < need * 1.05:
        return (f"not enough disk space in {ckpt_dir} for the next checkpoint: about "
                f"{_mib(need)} needed (the size of {prev}), {_mib(free)} free. 'latest' still "
                f"names {prev}, which is intact: free space (or lower keep_checkpoints) and "
                "resume with --resume.")
    return None


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int = 2,
         settings: Optional[Dict[str, Any]] = None) -> str:
    """Save on all ranks, write the manifest, then publish it as ``latest``; keep the
    ``keep`` newest complete checkpoints.  Collective: call on every rank."""
    tag = tag_for_step(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    rank, world = _rank(), _world()
    settings = dict(settings or run_settings(engine, world))
    os.makedirs(ckpt_dir, exist_ok=True)
    msg = None
    if rank == 0:
        try:
            latest = read_latest(ckpt_dir)
        except CheckpointError:
            latest = None           # garbage 'latest': replaced below once this save is done
        if latest == tag:
            msg = (f"refusing to overwrite {tag_dir}: 'latest' names it (saving the same step "
                   "twice)")
        elif os.path.isdir(tag_dir):
            # a stale partial save (or an abandoned timeline after --resume_tag)
            shutil.rmtree(tag_dir)
        msg = msg or _space_check(ckpt_dir)
    _raise_if_any(_all_gather(msg), CheckpointSaveError)   # also the barrier after rmtree

    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        free = _free_bytes(ckpt_dir)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        hint = "the disk is full" if full else \
            "a full disk shows up as 'unexpected pos' or 'file write failed'"
        raise CheckpointSaveError(
            f"saving checkpoint {tag_dir} failed on rank {rank}: {type(e).__name__}: "
            f"{str(e).strip()[:300]} ({hint}; {_mib(free)} free now). "
            f"'latest' still names {_safe_latest(ckpt_dir)}, which is intact; the partial "
            f"{tag} is not referenced. Free space and resume with --resume.") from e
    _barrier()

    # every rank fsyncs + checksums a share of the tag's files; rank 0 writes the manifest
    files = _tag_files(tag_dir)
    mine = {rel: checksum_file(os.path.join(tag_dir, rel), fsync=True)
            for rel in files[rank::world]}
    entries: Dict[str, Dict[str, int]] = {}
    for part in _all_gather(mine):
        for rel, (size, crc) in part.items():
            entries[rel] = {"size": size, CHECKSUM: crc}
    if rank == 0:
        import deepspeed
        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "step": int(step),
                    "checksum": CHECKSUM, "settings": settings,
                    "deepspeed": deepspeed.__version__, "torch": torch.__version__,
                    "time": time.time(), "files": entries}
        _atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
        write_latest(ckpt_dir, tag)
        if keep > 0:
            _prune(ckpt_dir, step, keep)
    _barrier()
    return tag


def _safe_latest(ckpt_dir: str) -> Optional[str]:
    try:
        return read_latest(ckpt_dir)
    except CheckpointError:
        return None


def _prune(ckpt_dir: str, step: int, keep: int) -> None:
    """Keep the ``keep`` newest complete tags up to ``step``; drop older ones and older
    partial ones.  Newer tags (an abandoned timeline after --resume_tag) are left."""
    older = [(s, t) for t in list_tags(ckpt_dir)
             if (s := _step_of(t)) is not None and s <= step]
    complete = [x for x in older if os.path.exists(os.path.join(ckpt_dir, x[1], MANIFEST))]
    kept = {t for _, t in sorted(complete, reverse=True)[:keep]}
    for s, t in older:
        if t not in kept and s < step:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


# ----------------------------------------------------------------------------- safe loading

#: every global the pickles of our checkpoints hold beyond what torch's ``weights_only``
#: unpickler accepts by itself (tensors, storages, torch dtypes, dicts, lists, tuples, sets,
#: OrderedDict, str/int/float/bool/None): name as the pickle spells it -> where it comes
#: from.  Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real
#: checkpoints (DeepSpeed 0.19.8, torch 2.13: pretraining under ZeRO 0/1/2/3 x fp32/bf16/
#: fp16, one and two ranks; fine-tuning ZeRO 0/2/3); each is a small data holder whose
#: construction runs no code of the file's choosing.
SAFE_GLOBALS: Dict[str, str] = {
    # DeepSpeed's ZeRO-1/2/3 optimizer state files (*_optim_states.pt)
    "deepspeed.runtime.zero.config.ZeroStageEnum":
        "ZeRO-1/2/3 optimizer states: 'zero_stage' (an Enum of ints)",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler":
        "ZeRO-1/2/3 optimizer states in fp32 and bf16: 'loss_scaler' (static scale)",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler":
        "ZeRO-1/2/3 optimizer states in fp16: 'loss_scaler' (dynamic scale)",
    "deepspeed.utils.tensor_fragment.fragment_address":
        "ZeRO-1/2 optimizer states: 'param_slice_mappings' (a dataclass of two ints)",
    # checkpoints written before the trainer stored NumPy's RNG state as a plain list
    # (model states files, client state 'rng'): a uint32 array.  Kept so those runs resume
    # and export; nothing written now holds them.
    "numpy._core.multiarray._reconstruct":
        "model states of older checkpoints: NumPy's RNG key array (NumPy 2 spelling)",
    "numpy.core.multiarray._reconstruct":
        "model states of older checkpoints: the same function as NumPy 1 spells it",
    "numpy.ndarray": "model states of older checkpoints: NumPy's RNG key array",
    "numpy.dtype": "model states of older checkpoints: the key array's dtype (uint32)",
    "numpy.dtypes.UInt32DType": "model states of older checkpoints: the uint32 dtype's class "
                                "(set when the dtype is rebuilt)",
}

#: the command-line opt-in that skips the check (train.py, finetune.py, infer, export to-pt)
TRUST_FLAG = "--trust_checkpoint"

_trust_default = False


def trust_checkpoints(on: bool = True) -> None:
    """The process-wide default of ``trust`` (set from ``--trust_checkpoint`` by the command
    lines): checkpoint directories are loaded without the safe check, for a run the user
    made themselves that holds something outside :data:`SAFE_GLOBALS`."""
    global _trust_default
    _trust_default = bool(on)


@contextlib.contextmanager
def trusting(on: bool):
    """:func:`trust_checkpoints` for the duration of a ``with`` block (then as before)."""
    global _trust_default
    before, _trust_default = _trust_default, bool(on)
    try:
        yield
    finally:
        _trust_default = before


def trusted(trust: Optional[bool] = None) -> bool:
    """``trust`` itself, or the process-wide default (:func:`trust_checkpoints`) when None."""
    return _trust_default if trust is None else bool(trust)


def _resolve(name: str) -> Any:
    """The object a pickle's ``module.qualname`` names (None: not importable here)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            with warnings.catch_warnings():     # numpy.core: a deprecated alias in NumPy 2
                warnings.simplefilter("ignore")
                obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for p in parts[cut:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


@functools.lru_cache(maxsize=None)
def _allowed() -> Tuple[Tuple[Any, str], ...]:
    """:data:`SAFE_GLOBALS` as ``(object, name)`` pairs for ``torch.serialization.safe_globals``."""
    return tuple((obj, name) for name in SAFE_GLOBALS
                 if (obj := _resolve(name)) is not None)


_ADVICE = re.compile(r"\s*(Please use `torch\.serialization|Check the documentation|"
                     r"Re-running `torch\.load`)")


def _reason(path: str, e: BaseException) -> str:
    """The cause torch gives, without its advice (never "weights_only=False")."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        return "not a file torch.save writes: neither a complete zip archive nor a pickle"
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = _ADVICE.split(text.strip(), maxsplit=1)[0].strip()
    text = " ".join(text.split())[:300]
    name = type(e).__name__
    if not text or "weights_only" in text or "trust" in text:
        return name
    return text if isinstance(e, pickle.UnpicklingError) else f"{name}: {text}"


def _offending(path: str, e: BaseException) -> List[str]:
    """The globals (or built types) of ``path`` outside the allow-list."""
    found: List[str] = []
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                 if g not in SAFE_GLOBALS]
    except Exception:       # not a zip checkpoint: what the unpickler said
        pass
    text = str(e)
    found += [g for g in re.findall(r"GLOBAL ([\w.]+) was not an allowed global", text)
              if g not in found]
    found += [g for g in re.findall(r"but got <class '([\w.]+)'>", text) if g not in found]
    return found


def _refusal(path: str, e: BaseException, expect: str, hint: str) -> UnsafeCheckpointError:
    bad = _offending(path, e)
    if bad:
        which = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        return UnsafeCheckpointError(
            f"checkpoint file {path} holds {which}, which {'is' if len(bad) == 1 else 'are'} "
            "not on the allow-list of what DeepSpeed and torch store: refused (loading it "
            f"could run code). {hint}".strip())
    return UnsafeCheckpointError(f"{path} is not {expect} ({_reason(path, e)}); not loaded")


#: what a tag's files are, and the way out, in a refusal
_TAG_EXPECT = "a checkpoint file of the expected kind (a DeepSpeed model or optimizer state)"
_TAG_HINT = (f"If you made this checkpoint yourself (e.g. with another DeepSpeed version that "
             f"stores other types), pass {TRUST_FLAG} to load it as it is.")


def safe_load(path: str, expect: str = _TAG_EXPECT, hint: str = _TAG_HINT,
              mmap: bool = False) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only=True`` and :data:`SAFE_GLOBALS`
    allowed; anything else raises :class:`UnsafeCheckpointError` naming the file and the
    global (``expect``: what the file should be, ``hint``: the way out).  ``mmap``: map the
    tensors instead of reading them (a check that keeps memory low)."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(_allowed())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, MemoryError):
        raise
    except Exception as e:      # UnpicklingError, RuntimeError (zip), KeyError, EOFError, ...
        err = _refusal(path, e, expect, hint)
    raise err


def check_file_safe(path: str) -> None:
    """:func:`safe_load` of one file (tensors memory-mapped, the result dropped)."""
    safe_load(path, mmap=True)


def _pt_files(tag_dir: str) -> List[str]:
    return [rel for rel in _tag_files(tag_dir) if rel.endswith(".pt")]


def check_tag_safe(tag_dir: str, share: Optional[Tuple[int, int]] = None) -> List[str]:
    """Refusals of a tag's ``.pt`` files (``[]``: every one passes the safe load).
    ``share=(rank, world)`` checks every ``world``-th file from ``rank`` on."""
    files = _pt_files(tag_dir)
    if share is not None:
        files = files[share[0]::share[1]]
    problems = []
    for rel in files:
        try:
            check_file_safe(os.path.join(tag_dir, rel))
        except UnsafeCheckpointError as e:
            problems.append(str(e))
    return problems


def _check_safe_collective(ckpt_dir: str, tag: str) -> None:
    """:func:`check_tag_safe` split over the ranks; every rank raises the first refusal."""
    mine = check_tag_safe(os.path.join(ckpt_dir, tag), share=(_rank(), _world()))
    problems = sorted(p for ps in _all_gather(mine) for p in ps)
    _raise_if_any(problems, UnsafeCheckpointError)


# ----------------------------------------------------------------------------- load

def load(engine, ckpt_dir: str, tag: str, settings: Optional[Dict[str, Any]] = None,
         trust: Optional[bool] = None) -> Dict[str, Any]:
    """Verify ``tag`` (manifest), check its settings and that every file passes the safe
    load (unless ``trust``: :func:`trusted`), then load it; returns the client state.
    Collective: call on every rank."""
    man = _verify_collective(ckpt_dir, tag)
    if man.get("settings"):
        check_settings(man["settings"], settings or run_settings(engine), ckpt_dir, tag)
    if not trusted(trust):
        _check_safe_collective(ckpt_dir, tag)
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    # DeepSpeed restores the scheduler's position but not the learning rate it had
    # written into the optimizer: re-apply it, or the first resumed step uses the
    # initial (warmup) lr and the run drifts from an uninterrupted one
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and hasattr(sched, "last_batch_iteration"):
        sched.step(sched.last_batch_iteration)
    return client_state or {}


def load_latest(engine, ckpt_dir: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Load (verified) the checkpoint ``latest`` names; ``(None, {})`` when there is none."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None, {}
    return tag, load(engine, ckpt_dir, tag)


def check_new_checkpoint_dir(ckpt_dir: str) -> None:
    """Refuse to write a new checkpoint over an existing one (a tag directory without
    ``latest`` included)."""
    tags = list_tags(ckpt_dir)
    if tags or os.path.exists(os.path.join(ckpt_dir, LATEST)):
        raise ValueError(f"{ckpt_dir} already holds a checkpoint ({tags[:4]}); choose a new "
                         "directory")
