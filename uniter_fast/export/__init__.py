"""DeepSpeed checkpoints to plain UNITER state dicts: the library behind
``python -m uniter_fast.export`` (the command line is :mod:`uniter_fast.export.__main__`).

:func:`to_pt` writes an fp32 ``state_dict`` with exactly the original UNITER key
names (for the pretraining model both tied weights present), loadable by the
original code with ``strict=True``.  It always exports the fp32 master weights
(:func:`consolidate`): ZeRO-1/2/3 checkpoints are consolidated from their fp32
partitions, ZeRO-0 bf16/fp16 ones from the optimizer's fp32 copy, ZeRO-0 fp32
ones from the module.  The tag's manifest is verified first, then every file passes the
safe load (:func:`uniter_fast.checkpoint.check_tag_safe`); a tag that lacks
a file (e.g. a save killed between DeepSpeed's writes) or whose masters cannot
be found is refused -- never a silent bf16 export (``allow_module_weights``
exports the half-precision module weights on purpose).  What a fine-tuned model
must hold is the task's business: its check is passed in (``check=``); this
module knows no task.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import checkpoint as ckpt_lib

# tied weights: (key that may be missing in a checkpoint, key it is tied to)
TIED = (("cls.predictions.decoder.weight", "uniter.embeddings.word_embeddings.weight"),
        ("feat_regress.weight", "uniter.img_embeddings.img_linear.weight"))


def fill_tied_weights(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for a, b in TIED:
        if a not in sd and b in sd:
            sd[a] = sd[b]
        elif b not in sd and a in sd:
            sd[b] = sd[a]
    return sd


class ExportError(ValueError):
    """A checkpoint that cannot be exported without losing precision (or at all)."""


def _intact_hint(ckpt_dir: str, tag: str) -> str:
    good = ckpt_lib.newest_intact_tag(ckpt_dir, exclude=(tag,))
    return (f" The newest intact tag is {good}: pass --tag {good}." if good else
            " No intact tag is left in this directory.")


def _model_states_file(tag_dir: str) -> str:
    for pat in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(tag_dir, pat)
        if os.path.exists(path):
            return path
    raise ExportError(f"{tag_dir} holds no DeepSpeed model states "
                      "(mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt)")


def _stage_and_precision(state: Dict[str, Any]):
    ds = state.get("ds_config") or {}

    def on(k):
        return bool((ds.get(k) or {}).get("enabled", False))
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    return stage, ("bf16" if on("bf16") or on("bfloat16") else "fp16" if on("fp16") else "fp32")


def _missing_zero_files(tag_dir: str, stage: int, world: int) -> List[str]:
    missing = []
    for r in range(world):
        if not glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
            missing.append(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if stage == 3 and not os.path.exists(
                os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")):
            missing.append(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    return missing


def _zero0_masters(state: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-0 bf16/fp16 checkpoint, by parameter name, each
    checked to round to the stored module weight."""
    opt = state.get("optimizer") or {}
    names = state.get("param_group_names")
    if names is None:
        raise ExportError(f"{where}: no parameter-group names stored (a checkpoint written by "
                          "an older version), so its fp32 master weights cannot be matched "
                          "to names (--allow_module_weights exports the half-precision module "
                          "weights instead)")
    groups = opt.get("fp32_groups")
    if groups is None and opt.get("fp32_groups_flat") is not None:
        module = state["module"]
        groups = []
        for flat, ns in zip(opt["fp32_groups_flat"], names):
            parts, off = [], 0
            for n in ns:
                k = module[n].numel()
                parts.append(flat[off:off + k].view_as(module[n]))
                off += k
            groups.append(parts)
    if groups is None or len(groups) != len(names):
        raise ExportError(f"{where}: the optimizer state holds no fp32 master copy matching "
                          f"the {len(names)} parameter groups")
    module, out = state["module"], {}
    for ts, ns in zip(groups, names):
        if len(ts) != len(ns):
            raise ExportError(f"{where}: fp32 master group of {len(ts)} tensors for "
                              f"{len(ns)} parameter names")
        for t, n in zip(ts, ns):
            w = module.get(n)
            if w is None or tuple(t.shape) != tuple(w.shape) or \
                    not torch.equal(t.to(w.dtype), w):
                raise ExportError(f"{where}: the fp32 master copy of {n} does not match its "
                                  "module weight; refusing to export")
            out[n] = t.float()
    return out


def consolidate(ckpt_dir: str, tag: Optional[str] = None,
                allow_module_weights: bool = False, fill_tied: bool = True,
                trust: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """fp32 (master) state dict of a DeepSpeed checkpoint (any ZeRO stage), verified.
    ``fill_tied``: add the pretraining model's tied weights (not for fine-tuning models).
    Every ``.pt`` file of the tag passes the safe load (weights_only plus
    :data:`~uniter_fast.checkpoint.SAFE_GLOBALS`) before anything unpickles it, unless
    ``trust`` (default: :func:`~uniter_fast.checkpoint.trusted`, ``--trust_checkpoint``)."""
    tag = tag or ckpt_lib.read_latest(ckpt_dir)
    if tag is None:
        tags = ckpt_lib.list_tags(ckpt_dir)
        raise ExportError(f"{ckpt_dir}: no 'latest' file; pass --tag (present: {tags[:6]})")
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ExportError(f"checkpoint {tag_dir} does not exist (present: "
                          f"{ckpt_lib.list_tags(ckpt_dir)[:6]})")
    problems = ckpt_lib.verify_tag(tag_dir)
    if problems and ckpt_lib.read_manifest(tag_dir) is not None:
        raise ExportError(f"checkpoint {tag_dir} is damaged: {'; '.join(problems[:4])}."
                          + _intact_hint(ckpt_dir, tag))
    if problems:
        print(f"warning: {tag_dir} has no {ckpt_lib.MANIFEST}: not verified", file=sys.stderr)
    mfile = _model_states_file(tag_dir)
    if ckpt_lib.trusted(trust):         # the user's own run: DeepSpeed's full unpickling
        state = torch.load(mfile, map_location="cpu", weights_only=False)
    else:
        # zero_to_fp32 below unpickles every file fully: each must pass the safe load first
        bad = ckpt_lib.check_tag_safe(tag_dir)
        if bad:
            raise ckpt_lib.UnsafeCheckpointError(bad[0])
        state = ckpt_lib.safe_load(mfile)
    stage, precision = _stage_and_precision(state)
    world = int(state.get("dp_world_size") or 1)
    where = f"checkpoint {tag_dir} (ZeRO-{stage}, {precision})"
    module = state["module"]
    if stage >= 1:
        missing = _missing_zero_files(tag_dir, stage, world)
        if missing and not allow_module_weights:
            raise ExportError(
                f"{where} lacks {missing} (a save interrupted between DeepSpeed's writes?): "
                f"its fp32 master weights are not all there, and exporting the {precision} "
                "module weights instead would lose precision; refusing."
                + _intact_hint(ckpt_dir, tag) + " (--allow_module_weights exports the module "
                "weights anyway)")
        if not missing:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
        elif stage == 3:
            raise ExportError(f"{where} lacks {missing}: ZeRO-3 module weights are partitioned "
                              "over those files; cannot export")
        else:
            sd = dict(module)
    elif precision == "fp32" or allow_module_weights:
        sd = dict(module)
    else:
        sd = dict(module)
        masters = _zero0_masters(state, where)
        sd.update(masters)
        # a tied weight is one parameter (one master) under two keys; torch.save kept the
        # two module entries on one storage, which finds the alias
        by_ptr = {(module[n].data_ptr(), tuple(module[n].shape)): n for n in masters}
        buffers = set(state.get("buffer_names") or ())
        left = []
        for k, v in module.items():
            if k in masters or k in buffers or not v.is_floating_point():
                continue
            src = by_ptr.get((v.data_ptr(), tuple(v.shape)))
            if src is None:
                left.append(k)
            else:
                sd[k] = masters[src]
        if left:
            raise ExportError(f"{where}: no fp32 master copy of {left[:5]}; refusing")
    if allow_module_weights and precision != "fp32":
        print(f"warning: exporting the {precision} module weights of {tag_dir} "
              "(--allow_module_weights), not fp32 master weights", file=sys.stderr)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
          for k, v in sd.items()}
    return fill_tied_weights(sd) if fill_tied else sd


def to_pt(ckpt_dir: str, out_path: str, tag: Optional[str] = None,
          allow_module_weights: bool = False, fill_tied: bool = True,
          check: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
          trust: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Write the fp32 state dict of a DeepSpeed checkpoint to ``out_path`` (atomically).

    ``fill_tied``: add the pretraining model's tied weights (off for a fine-tuned model,
    whose state dict holds exactly its own keys); ``check``: called with the state dict
    before anything is written (e.g. a task's key check), raises to refuse; ``trust``: see
    :func:`consolidate`."""
    sd = consolidate(ckpt_dir, tag, allow_module_weights, fill_tied=fill_tied, trust=trust)
    if check is not None:
        check(sd)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"checkpoint weight {k} contains NaN or inf; refusing to export")
    tmp = out_path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, out_path)
    return sd


#: what a plain state dict file is, in a refusal
PT_EXPECT = ("a plain state dict (a .pt file of tensors by name, as torch.save(model."
             "state_dict()) or python -m uniter_fast.export to-pt write it)")
_PT_HINT = ("A plain state dict holds tensors only (python -m uniter_fast.export to-pt "
            "writes one from a DeepSpeed checkpoint).")


def load_state_dict_file(pt_path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict file (``.pt``), always loaded safely: ``weights_only=True`` with
    :data:`~uniter_fast.checkpoint.SAFE_GLOBALS` allowed (a DeepSpeed model states file
    passes too); anything else raises :class:`~uniter_fast.checkpoint.UnsafeCheckpointError`
    naming the file, never torch's own advice."""
    sd = ckpt_lib.safe_load(pt_path, expect=PT_EXPECT, hint=_PT_HINT)
    if not isinstance(sd, dict):
        raise ckpt_lib.UnsafeCheckpointError(
            f"{pt_path} is not {PT_EXPECT}: it holds a {type(sd).__name__}, not a dict")
    return sd


def check_keys(model: torch.nn.Module, sd: Dict[str, torch.Tensor], where: str,
               shapes: bool = False, limit: Optional[int] = None) -> None:
    """``sd`` has exactly ``model``'s keys (and, with ``shapes``, their shapes); else a
    ``ValueError`` "<where> do not fit <model class>: ..." with the differences
    (``where``: e.g. "the weights of checkpoint x.pt")."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = ([k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
           if shapes else [])
    if missing or unexpected or bad:
        def cut(xs):
            return f"{xs[:limit]}{' ...' if limit and len(xs) > limit else ''}"
        raise ValueError(f"{where} do not fit {type(model).__name__}: missing {cut(missing)}, "
                         f"unexpected {cut(unexpected)}"
                         + (f", shape mismatch {cut(bad)}" if bad else ""))


