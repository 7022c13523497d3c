"""Training config (UNITER's JSON format) + DeepSpeed config, and the
command-line overrides of both, each declared once in :data:`OVERRIDES`."""
from __future__ import annotations

import argparse
import difflib
import json
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..model.compile import add_compile_arguments

__all__ = ["OVERRIDES", "DS_OVERRIDES", "TRAINER_KEYS", "DEEPSPEED_KEYS", "build_arg_parser",
           "load_configs", "read_json", "apply_deepspeed_overrides", "check_unknown_keys"]

# (name, type, help): ``--name`` overrides the training config's ``name``
OVERRIDES: Tuple[Tuple[str, type, str], ...] = (
    ("output_dir", str, "where checkpoints, metrics and configs are written"),
    ("num_train_steps", int, "optimizer steps of the whole run"),
    ("model_config", str, "model config JSON or a packaged name (uniter-base, uniter-tiny, ...)"),
    ("checkpoint", str, "plain state dict (.pt) to start from"),
    ("train_batch_size", int, "tokens per batch (token-bucket batching)"),
    ("val_batch_size", int, "tokens per validation batch"),
    ("seed", int, "random seed"),
    ("save_steps", int, "checkpoint every N steps"),
    ("valid_steps", int, "validate every N steps"),
    ("log_steps", int, "write a metrics record every N steps"),
    ("warmup_steps", int, "linear learning-rate warmup steps"),
    ("itm_ot_lambda", float, "weight of the WRA (optimal transport) loss in itm"),
    ("mrm_prob", float, "masked region probability"),
    ("itm_neg_prob", float, "probability of a negative pair in itm"),
    ("n_workers", int, "DataLoader workers"),
    ("learning_rate", float, "peak learning rate"),
)

#: ``--precision`` choices (DeepSpeed's bf16 / fp16 sections, or neither)
PRECISIONS: Tuple[str, ...] = ("bf16", "fp16", "fp32")

# (name, choices or type, help): ``--name`` overrides the DeepSpeed config
DS_OVERRIDES: Tuple[Tuple[str, Any, str], ...] = (
    ("zero_stage", (0, 1, 2, 3), "ZeRO stage"),
    ("precision", PRECISIONS, "training precision (default: the DeepSpeed config's; "
                              "a new run trains in fp32 where bf16 would be emulated)"),
    ("gradient_accumulation_steps", int, "micro-batches per optimizer step"),
)


# training-config keys the trainer itself (and apply_deepspeed_overrides) reads, for
# every task; a task adds its own in TrainTask.known_keys
TRAINER_KEYS = frozenset({
    "output_dir", "num_train_steps", "seed", "save_steps", "valid_steps", "log_steps",
    "keep_checkpoints", "warmup_steps", "learning_rate", "grad_norm", "betas",
    "weight_decay", "gradient_accumulation_steps"})

# top-level keys DeepSpeed 0.19 reads from its config (DeepSpeedConfig), plus the legacy
# spelling "bfloat16"
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint",
    "comet", "comms_logger", "communication_data_type", "compile", "compression_training",
    "csv_monitor", "curriculum_learning", "data_efficiency", "data_types",
    "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc",
    "dump_state", "eigenvalue", "elasticity", "expert_parallel", "flops_profiler", "fp16",
    "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline",
    "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients",
    "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization"})


def check_unknown_keys(cfg: Dict[str, Any], known: Iterable[str], where: str,
                       strict: bool = False) -> List[str]:
    """Warn (``strict``: raise ``ValueError``) about top-level keys of ``cfg`` that are
    not in ``known``, each with the nearest known key.  Returns the unknown keys."""
    known = sorted(set(known))
    unknown = sorted(k for k in cfg if k not in known)
    if not unknown:
        return []
    parts = []
    for k in unknown:
        near = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
        parts.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    msg = f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}"
    if strict:
        raise ValueError(msg + " (--strict_config)")
    warnings.warn(msg + "; ignored (--strict_config makes this an error)", UserWarning,
                  stacklevel=2)
    return unknown


def read_json(path: str, what: str) -> Dict[str, Any]:
    """Load a JSON object, with errors that name the file and what it is."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} not found")
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not a UTF-8 text file ({e.reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def build_arg_parser(description: str = "", default_config: Optional[str] = None,
                     overrides: Iterable[Tuple[str, type, str]] = OVERRIDES
                     ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config,
                   help="UNITER-style training config JSON (default: the embedded synthetic one)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed config JSON (default: ./ds.json)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--resume", action="store_true",
                   help="continue from output_dir/ckpt/latest (same data order and step count)")
    p.add_argument("--resume_tag", default=None,
                   help="with --resume: continue from this checkpoint tag (e.g. global_step400) "
                        "instead of the one 'latest' names")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load checkpoint directories (--resume, a run directory as the "
                        "config's checkpoint) as DeepSpeed does, without the safe check of "
                        "their files: only for a run you made yourself whose files hold types "
                        "outside the allow-list (docs/reliability.md)")
    p.add_argument("--allow_config_change", action="store_true",
                   help="with --resume: continue under a training / DeepSpeed config that "
                        "differs from the run's (the old files are kept as "
                        "train_config.step<N>.json / ds_config.step<N>.json and the change is "
                        "logged); without it such a resume is refused")
    p.add_argument("--strict_config", action="store_true",
                   help="unknown keys in the training config or ds.json are an error, not a "
                        "warning")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    add_compile_arguments(p)
    p.add_argument("--debug_rank_files", action="store_true",
                   help="every rank writes metrics_rank{r}.jsonl (with a fingerprint of its "
                        "batches) and its final weights final_weights_rank{r}.pt")
    for name, typ, help_ in overrides:
        p.add_argument(f"--{name}", type=typ, default=None, help=f"override config {name}: {help_}")
    for name, kind, help_ in DS_OVERRIDES:
        if isinstance(kind, tuple):
            p.add_argument(f"--{name}", type=type(kind[0]), choices=list(kind), default=None,
                           help=f"override ds.json: {help_}")
        else:
            p.add_argument(f"--{name}", type=kind, default=None, help=f"override ds.json: {help_}")
    return p


def apply_precision(ds: Dict[str, Any], precision: str) -> None:
    """Set the DeepSpeed config's bf16 / fp16 sections for ``precision`` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"


def apply_deepspeed_overrides(cfg: Dict[str, Any], ds: Dict[str, Any], args) -> Dict[str, Any]:
    """Command-line and UNITER training-config settings that land in the DeepSpeed config."""
    if getattr(args, "zero_stage", None) is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if getattr(args, "precision", None) is not None:
        apply_precision(ds, args.precision)
    cli_accum = getattr(args, "gradient_accumulation_steps", None)
    if cli_accum is not None:
        if int(cli_accum) < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {cli_accum}")
        ds["gradient_accumulation_steps"] = cli_accum
    ds.pop("train_batch_size", None)   # batches are token buckets; DS only counts micro-batches
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    sched = ds.get("scheduler")
    if sched and sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sp = sched.setdefault("params", {})
        sp["total_num_steps"] = int(cfg["num_train_steps"])
        warm = cfg.get("warmup_steps", sp.get("warmup_num_steps", 0))
        sp["warmup_num_steps"] = int(min(warm, cfg["num_train_steps"]))
    # UNITER's own optimizer keys, when a training config carries them, win over ds.json
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    op = opt.setdefault("params", {})
    if cfg.get("grad_norm") is not None:
        ds["gradient_clipping"] = 0.0 if cfg["grad_norm"] == -1 else float(cfg["grad_norm"])
    if cfg.get("betas") is not None:
        op["betas"] = [float(b) for b in cfg["betas"]]
    if cfg.get("weight_decay") is not None:
        op["weight_decay"] = float(cfg["weight_decay"])
    if cfg.get("gradient_accumulation_steps") is not None and cli_accum is None:
        ds["gradient_accumulation_steps"] = int(cfg["gradient_accumulation_steps"])
    if int(ds.get("gradient_accumulation_steps", 1)) < 1:
        raise ValueError("gradient_accumulation_steps must be >= 1, got "
                         f"{ds['gradient_accumulation_steps']} (training or DeepSpeed config)")
    if cfg.get("learning_rate") is not None:
        op["lr"] = cfg["learning_rate"]
        if sched and "warmup_max_lr" in sched.get("params", {}):
            sched["params"]["warmup_max_lr"] = cfg["learning_rate"]
    return ds


def bf16_emulated(ds: Dict[str, Any]) -> bool:
    """The DeepSpeed config asks for bf16, the accelerator is the CPU and the CPU has no
    native bf16 matmul (oneDNN's check: AVX512-BF16 / AMX), so bf16 would be emulated
    (several times slower than fp32: 3.4x measured on an AVX2 AMD EPYC)."""
    if not (ds.get("bf16") or {}).get("enabled"):
        return False
    import torch
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return False
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fp32_if_bf16_emulated(ds: Dict[str, Any], args, who: str = "train") -> bool:
    """Without ``--precision``: train in fp32 where bf16 would be emulated
    (:func:`bf16_emulated`); sets ``args.precision = "fp32"`` and says so.  An explicit
    ``--precision`` (bf16 included) is always kept.  True if it switched."""
    if getattr(args, "precision", None) is not None or not bf16_emulated(ds):
        return False
    args.precision = "fp32"
    apply_precision(ds, "fp32")
    print(f"[{who}] this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32, several "
          "times faster here than emulated bf16 (--precision bf16 forces it)", flush=True)
    return True


def load_configs(args, required: Sequence[str] = ("output_dir", "num_train_steps",
                                                  "train_batch_size", "train_datasets",
                                                  "model_config"),
                 overrides: Iterable[Tuple[str, type, str]] = OVERRIDES,
                 known_keys: Optional[Iterable[str]] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(training config, DeepSpeed config) with the command line's overrides applied.

    With ``known_keys`` (the task's keys) unknown training-config keys are
    reported (:func:`check_unknown_keys`; ``--strict_config``: an error), as are
    unknown top-level keys of the DeepSpeed config.
    """
    overrides = tuple(overrides)
    strict = bool(getattr(args, "strict_config", False))
    cfg = read_json(args.config, "training config")
    if known_keys is not None:
        check_unknown_keys(cfg, set(known_keys) | TRAINER_KEYS | {o[0] for o in overrides},
                           f"training config {args.config}", strict)
    for name, _, _ in overrides:
        v = getattr(args, name, None)
        if v is not None:
            cfg[name] = v
    for k in required:
        if cfg.get(k) is None:
            raise ValueError(f"training config {args.config} lacks {k!r}")
    if int(cfg["num_train_steps"]) < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {cfg['num_train_steps']}")
    ds_path = args.deepspeed_config or "ds.json"
    if not os.path.exists(ds_path):
        raise ValueError(f"DeepSpeed config {ds_path} not found (pass --deepspeed_config)")
    ds = read_json(ds_path, "DeepSpeed config")
    check_unknown_keys(ds, DEEPSPEED_KEYS, f"DeepSpeed config {ds_path}", strict)
    return cfg, apply_deepspeed_overrides(cfg, ds, args)


def from_pt_argv(ckpt_dir: str, config: Optional[str] = None,
                 deepspeed_config: Optional[str] = None) -> List[str]:
    """The command line of a one-step run whose output directory holds ``ckpt_dir``: how
    ``export from-pt`` builds the model and engine exactly as training would."""
    argv = ["--output_dir", os.path.dirname(os.path.abspath(ckpt_dir.rstrip("/"))),
            "--num_train_steps", "1"]
    if config:
        argv += ["--config", config]
    if deepspeed_config:
        argv += ["--deepspeed_config", deepspeed_config]
    return argv
