"""The trainer: one loop for every task.

Owns the output directory (refuses to overwrite a run without ``--resume``,
and refuses ``--resume`` with nothing to resume), seeds, the DeepSpeed engine,
gradient accumulation, logging, validation scheduling, checkpoints (verified,
crash-safe ``latest``, see :mod:`uniter_fast.checkpoint`), exact resume (data
position, Python/NumPy/torch RNG, optimizer and scheduler state; the metrics
file is rewound to the resumed step) and a checkpoint on SIGINT/SIGTERM (see
:mod:`.signals`).
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
import zlib
from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt_lib
from ..data import move_to_device
from ..data.sampler import config_seed
from ..model.compile import compile_counts, compile_model, use_compile
from .allocator import allocator_state
from .config import (
    PRECISIONS,
    apply_precision,
    build_arg_parser,
    fp32_if_bf16_emulated,
    load_configs,
)
from .distributed import barrier, init_distributed, setup_device
from .engine import create_engine, full_state_dict
from .metrics import MetricsWriter, RunningMean, progress_bar, rewind_jsonl
from .resume_config import check_resume_configs, keep_old_configs
from .signals import StopRequest
from .task import RunContext, TrainTask

__all__ = ["Trainer", "set_seed"]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    # NumPy's state as plain ints (not its uint32 array): a checkpoint then holds nothing
    # beyond tensors and containers (see checkpoint.SAFE_GLOBALS)
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state()}


def _set_rng_state(rs: Dict[str, Any]) -> None:
    random.setstate(rs["python"])
    np.random.set_state(tuple(rs["numpy"]))     # a list, or NumPy's tuple (older checkpoints)
    torch.set_rng_state(rs["torch"])


class Trainer:
    """Runs ``task`` as configured by ``argv`` (the command line of train.py / finetune.py)."""

    def __init__(self, task: TrainTask, default_config: Optional[str] = None,
                 description: str = "", parser=None):
        self.task = task
        self.parser = parser or build_arg_parser(description, default_config)

    # ------------------------------------------------------------------ setup
    def setup(self, argv: Optional[List[str]] = None) -> None:
        task = self.task
        self.args = args = self.parser.parse_args(argv)
        # --trust_checkpoint: every checkpoint this process loads (--resume, a run directory
        # as the config's checkpoint) skips the safe check
        ckpt_lib.trust_checkpoints(getattr(args, "trust_checkpoint", False))
        self.cfg, self.ds_config = load_configs(args, required=task.required_keys,
                                                known_keys=task.known_keys)
        task.configure(self.cfg, self.ds_config, args)
        cfg = self.cfg
        self.out_dir = cfg["output_dir"]
        self.ckpt_dir = os.path.join(self.out_dir, "ckpt")
        # before anything starts: every rank reads the (shared) dir, so every rank stops
        # with the same message -- an existing run without --resume, nothing to resume,
        # a checkpoint of another ZeRO stage / precision / world size
        self.resume_tag = ckpt_lib.check_output_dir(self.out_dir, args.resume, args.resume_tag)
        if self.resume_tag is None:
            # a new run without --precision: fp32 where bf16 would be emulated
            fp32_if_bf16_emulated(self.ds_config, args, getattr(task, "name", "train"))
        else:
            stored = ckpt_lib.stored_settings(self.ckpt_dir, self.resume_tag)
            if stored and args.precision is None and stored.get("precision") in PRECISIONS:
                # without --precision a resumed run keeps its checkpoint's precision
                args.precision = stored["precision"]
                apply_precision(self.ds_config, args.precision)
            if stored:
                world = int(os.environ.get("WORLD_SIZE", "1"))    # set by every launcher
                ckpt_lib.check_settings(stored, ckpt_lib.ds_settings(self.ds_config, world),
                                        self.ckpt_dir, self.resume_tag)
        self.rank, self.world_size, acc = init_distributed()
        self.device = setup_device(acc, args.local_rank, self.world_size)
        barrier()
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.seed = config_seed(cfg)
        set_seed(self.seed + self.rank)

        # data: rank 0 first (one-time generation of synthetic dbs), then everyone
        if self.rank == 0:
            task.prepare_data(cfg, self.rank)
        barrier()
        if self.rank != 0:
            task.prepare_data(cfg, self.rank)
        self.meta = task.data_meta(cfg)
        self.accum = int(self.ds_config.get("gradient_accumulation_steps", 1))
        self.train_loader = task.train_loader(cfg, self.rank, self.world_size, self.accum)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.val_loaders = task.val_loaders(cfg, self.rank, self.world_size)

        # model + engine
        torch.manual_seed(self.seed)     # same initial weights on every rank
        model = task.build_model(cfg, self.meta)
        self.compiled = use_compile(getattr(args, "compile", None), self.device)
        if self.compiled:
            # the forward compiled in place before DeepSpeed wraps the model: keys unchanged
            compile_model(model, backend=getattr(args, "compile_backend", "inductor"))
        groups = task.param_groups(model, cfg, self.ds_config)
        self.group_names = ckpt_lib.param_group_names(model, groups)
        self.engine = create_engine(model, groups, self.ds_config)
        self.settings = ckpt_lib.run_settings(self.engine, self.world_size)
        self.fp16 = self.engine.fp16_enabled()
        set_seed(self.seed + self.rank)
        self.ctx = RunContext(self.device, self.rank, self.world_size, self.zero_stage,
                              self.out_dir, cfg)

        self.global_step = 0
        self.resumed = False
        self.dropped_records = 0
        self.saved_step: Optional[int] = None
        config_change: Dict[str, Any] = {}
        if self.resume_tag is not None:
            # the configs as they will be written, against the run's, before the run dir
            # changes: a change that alters what the steps taken mean needs
            # --allow_config_change (and the old files are kept)
            config_change = check_resume_configs(
                self.out_dir, {"train_config.json": cfg, "ds_config.json": self.ds_config},
                self.resume_tag, getattr(args, "allow_config_change", False))
            self._resume(self.resume_tag)
        kept = {}
        if self.rank == 0:
            if config_change:
                kept = keep_old_configs(self.out_dir, config_change, self.resume_tag)
                print(f"[{task.name}] --allow_config_change: resuming {self.resume_tag} under "
                      f"changed settings {config_change}; the old configs are kept as "
                      f"{sorted(kept.values())}", flush=True)
            with open(os.path.join(self.out_dir, "train_config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
            with open(os.path.join(self.out_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)
        self.log = MetricsWriter(os.path.join(self.out_dir, "metrics.jsonl")
                                 if self.rank == 0 else None)
        if config_change:
            self.log({"event": "config_change", "step": self.global_step,
                      "resumed_from": self.resume_tag, "changes": config_change, "kept": kept})
        self.rank_log = MetricsWriter(os.path.join(self.out_dir,
                                                   f"metrics_rank{self.rank}.jsonl")
                                      if args.debug_rank_files else None)

    def _resume(self, tag: str) -> None:
        """Load ``tag`` (verified, settings checked), then make ``latest`` name it and
        rewind the metrics files to its step, so the run reads as one."""
        client = ckpt_lib.load(self.engine, self.ckpt_dir, tag, self.settings,
                               trust=getattr(self.args, "trust_checkpoint", False))
        stored_task = client.get("task")
        if stored_task is not None and stored_task != self.task.name:
            raise ValueError(f"{self.ckpt_dir}/{tag} is a checkpoint of a {stored_task!r} run; "
                             f"this command runs {self.task.name!r}: resume it with the task "
                             f"it was made with, or start a new run (--output_dir) from its "
                             f"weights (the config's checkpoint)")
        self.global_step = int(client.get("global_step", 0))
        self.resumed = self.global_step > 0
        if client.get("data") is not None:      # None: made by export from-pt
            self.train_loader.load_state_dict(client["data"])
        if client.get("rng") is not None:
            _set_rng_state(client["rng"])
        step = self.global_step
        if self.rank == 0:
            if ckpt_lib.read_latest(self.ckpt_dir) != tag:     # --resume_tag
                ckpt_lib.write_latest(self.ckpt_dir, tag)
            self.dropped_records = rewind_jsonl(
                os.path.join(self.out_dir, ckpt_lib.METRICS_FILE),
                lambda r: r.get("step") is None or int(r["step"]) <= step)
        # per-rank debug files count the step being computed (records before the step)
        rewind_jsonl(os.path.join(self.out_dir, f"metrics_rank{self.rank}.jsonl"),
                     lambda r: r.get("step") is None or int(r["step"]) < step)
        barrier()

    def _validation_missing(self, step: int, valid_steps: int, n_steps: int) -> bool:
        """Whether ``step`` is a validation step whose record the metrics file lacks (every
        rank reads the shared file after the resume's rewind, so all agree)."""
        if step % valid_steps != 0 and step != n_steps:
            return False
        path = os.path.join(self.out_dir, ckpt_lib.METRICS_FILE)
        if not os.path.exists(path):
            return True
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue              # a torn last line of a killed run
                if r.get("event") == "validation" and r.get("step") == step:
                    return False
        return True

    def client_state(self) -> Dict[str, Any]:
        return {"global_step": self.global_step, "data": self.train_loader.state_dict(),
                "rng": _rng_state(), "task": self.task.name, "settings": self.settings,
                "param_group_names": self.group_names}

    def save(self) -> str:
        tag = ckpt_lib.save(self.engine, self.ckpt_dir, self.global_step, self.client_state(),
                            keep=int(self.cfg.get("keep_checkpoints", 2)),
                            settings=self.settings)
        self.saved_step = self.global_step
        return tag

    def _stop_signal(self, stop: StopRequest) -> int:
        """The stop signal any rank received (0: none); every rank gets the same answer."""
        flag = int(stop.signum or 0)
        if self.world_size > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def validate(self) -> Dict[str, float]:
        """The task's validation, in eval mode; the RNG states are as before it (the
        checkpoint of this step was saved before it, so a resumed run continues from the
        same states as an uninterrupted one)."""
        rng = _rng_state()
        self.engine.eval()
        try:
            with torch.no_grad():
                return self.task.validate(self.engine, self.val_loaders, self.ctx)
        finally:
            self.engine.train()
            _set_rng_state(rng)

    # ------------------------------------------------------------------ loop
    def run(self, argv: Optional[List[str]] = None) -> Dict[str, Any]:
        self.setup(argv)
        stop = StopRequest()
        stop.install()
        try:
            return self._run(stop)
        finally:
            stop.restore()

    def _run(self, stop: StopRequest) -> Dict[str, Any]:
        task, cfg, engine, args = self.task, self.cfg, self.engine, self.args
        log = self.log
        n_steps = int(cfg["num_train_steps"])
        save_steps = int(cfg.get("save_steps") or n_steps)
        valid_steps = int(cfg.get("valid_steps") or n_steps)
        log_steps = int(cfg.get("log_steps") or 1)
        pbar = progress_bar(self.rank == 0 and not args.no_progress, n_steps, self.global_step,
                            task.name)
        running = defaultdict(RunningMean)
        engine.train()
        log({"event": "start", "step": self.global_step, "task": task.name,
             "world_size": self.world_size, "zero_stage": self.zero_stage,
             "dtype": str(next(engine.module.parameters()).dtype),
             "device": str(self.device), "resumed": self.resumed, "compile": self.compiled,
             "cpu_allocator": allocator_state(),
             **({"resumed_from": self.resume_tag, "dropped_records": self.dropped_records}
                if self.resume_tag is not None else {})})
        self.saved_step = self.global_step if self.resume_tag is not None else None

        t_start = time.time()
        t_last, tok_acc, ex_acc = time.time(), 0, 0
        last_val: Dict[str, float] = {}
        if self.resumed and self._validation_missing(self.global_step, valid_steps, n_steps):
            # stopped while validating a step whose checkpoint was already saved (the save
            # comes first): that validation runs now, so no result of the run is lost
            self.ctx.step = self.global_step
            last_val = self.validate()
            log({"step": self.global_step, "event": "validation", **last_val})
        micro = 0
        while self.global_step < n_steps:
            name, batch = self.train_loader.next()
            task.check_batch(name, batch)
            batch = move_to_device(batch, self.device)
            loss, extra = task.compute_loss(engine, name, batch, cfg)
            if not self.fp16 and not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(f"step {self.global_step}: {name} loss is "
                                         f"{float(loss)}; stopping before the weights are "
                                         "corrupted")
            engine.backward(loss)
            engine.step()
            micro += 1
            ntok, nex = task.batch_size(batch)
            tok_acc += ntok
            ex_acc += nex
            lval = float(loss.detach())
            running[name](lval)
            if self.rank_log.path:
                fp = int(zlib.crc32(batch["input_ids"].cpu().numpy().tobytes()))
                self.rank_log({"micro_step": micro, "step": self.global_step, "task": name,
                               "loss": lval, "data_fp": fp, "lr": float(engine.get_lr()[0]),
                               "n_examples": nex})
            if micro % self.accum != 0:      # not an optimizer step yet (gradient accumulation)
                continue
            self.global_step += 1
            step = self.global_step
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix({n.split("_")[0]: f"{m.val:.3f}" for n, m in running.items()},
                                 refresh=False)
            if step % log_steps == 0 or step == n_steps:
                now = time.time()
                rec = {"step": step, "task": name, "loss": lval,
                       "lr": float(engine.get_lr()[0]),
                       "tokens_per_s": tok_acc * self.world_size / max(now - t_last, 1e-9),
                       "examples_per_s": ex_acc * self.world_size / max(now - t_last, 1e-9),
                       "elapsed_s": now - t_start, **extra}
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    rec["grad_norm"] = float(gn)
                if self.fp16:
                    rec["loss_scale"] = float(engine.optimizer.cur_scale) \
                        if hasattr(engine.optimizer, "cur_scale") else None
                    rec["skipped_steps"] = int(engine.skipped_steps)
                rec.update({f"running/{n}": m.val for n, m in running.items()})
                log(rec)
                t_last, tok_acc, ex_acc = now, 0, 0
            # save first: a validation that fails (a bad val db, a crash) loses no step
            if step % save_steps == 0 or step == n_steps:
                self.save()
            if step % valid_steps == 0 or step == n_steps:
                self.ctx.step = step
                last_val = self.validate()
                log({"step": step, "event": "validation", **last_val})
                if pbar is not None:
                    pbar.write(f"step {step} validation: " +
                               ", ".join(f"{k}={v:.4f}" for k, v in sorted(last_val.items())))
            signum = self._stop_signal(stop)
            if signum:
                if self.saved_step != step:
                    self.save()
                rec = {"event": "interrupted", "step": step,
                       "signal": signal.Signals(signum).name,
                       "checkpoint": ckpt_lib.tag_for_step(step)}
                log(rec)
                if pbar is not None:
                    pbar.close()
                log.close()
                if self.rank_log.path:
                    self.rank_log.close()
                if self.rank == 0:
                    print(json.dumps(rec), flush=True)
                raise SystemExit(128 + signum)
        if pbar is not None:
            pbar.close()
        if self.rank_log.path:
            self.rank_log.close()
            torch.save(full_state_dict(engine, self.zero_stage),
                       os.path.join(self.out_dir, f"final_weights_rank{self.rank}.pt"))
        wall = time.time() - t_start
        summary = {"event": "end", "step": self.global_step, "task": task.name,
                   "train_wall_s": wall,
                   **({"compile": compile_counts()} if self.compiled else {}),
                   "skipped_steps": int(engine.skipped_steps) if self.fp16 else 0,
                   "running": {n: m.val for n, m in running.items()}, "validation": last_val}
        self.ctx.step = self.global_step
        task.end_of_run(engine, self.ctx, summary)
        log(summary)
        if self.rank == 0:
            log.close()
            print(json.dumps(summary))
        summary["engine"] = engine
        return summary
