"""UNITER pretraining under DeepSpeed.

    deepspeed uniter_fast/train.py --deepspeed_config ds.json

With no other argument this pretrains the tiny UNITER on the built-in
synthetic grounded dataset with all tasks (mlm, mrfr, mrc-kl, itm + WRA),
using the packaged ``configs/pretrain-synthetic-tiny.json``.  Other settings
come from a UNITER-style training config (``--config path.json``) plus
overrides (``--num_train_steps``, ``--output_dir``, ``--resume``, ...).

Outputs in ``output_dir``: ``ckpt/`` (DeepSpeed checkpoints; ``latest`` is
written atomically), ``metrics.jsonl`` (one JSON object per step and per
validation), ``train_config.json`` / ``ds_config.json`` (what was run).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # run as a script (``deepspeed uniter_fast/train.py``): import the package from
    # the repository root, not modules of uniter_fast/ as top-level names
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from uniter_fast import checkpoint as ckpt_lib  # noqa: E402
from uniter_fast.config import CONFIG_DIR, UniterConfig, config_path  # noqa: E402
from uniter_fast.data import (create_train_loader, create_val_loaders, move_to_device,  # noqa: E402
                              task_of, text_meta)

DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "pretrain-synthetic-tiny.json")
IMG_DIM, IMG_LABEL_DIM = 2048, 1601   # UNITER's constants (real BUTD features)


# ----------------------------------------------------------------------------- config
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="UNITER-style training config JSON (default: the embedded synthetic one)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed config JSON (default: ./ds.json)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--resume", action="store_true",
                   help="continue from output_dir/ckpt/latest (same data order and step count)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("--debug_rank_files", action="store_true",
                   help="every rank writes metrics_rank{r}.jsonl (with a fingerprint of its "
                        "batches) and its final weights final_weights_rank{r}.pt")
    # overrides of the training config
    for name, typ in [("output_dir", str), ("num_train_steps", int), ("model_config", str),
                      ("checkpoint", str), ("train_batch_size", int), ("seed", int),
                      ("save_steps", int), ("valid_steps", int), ("log_steps", int),
                      ("warmup_steps", int), ("itm_ot_lambda", float), ("mrm_prob", float),
                      ("itm_neg_prob", float), ("n_workers", int), ("learning_rate", float)]:
        p.add_argument(f"--{name}", type=typ, default=None, help=f"override config {name}")
    # overrides of the DeepSpeed config
    p.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=None)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=None)
    return p


def load_configs(args) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    with open(args.config) as f:
        cfg = json.load(f)
    for k in ("output_dir", "num_train_steps", "model_config", "checkpoint", "train_batch_size",
              "seed", "save_steps", "valid_steps", "log_steps", "warmup_steps", "itm_ot_lambda",
              "mrm_prob", "itm_neg_prob", "n_workers", "learning_rate"):
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    for k in ("output_dir", "num_train_steps", "train_batch_size", "train_datasets",
              "model_config"):
        if cfg.get(k) is None:
            raise ValueError(f"training config {args.config} lacks {k!r}")
    if cfg["num_train_steps"] < 1:
        raise ValueError("num_train_steps must be >= 1")
    ds_path = args.deepspeed_config or "ds.json"
    if not os.path.exists(ds_path):
        raise ValueError(f"DeepSpeed config {ds_path} not found (pass --deepspeed_config)")
    with open(ds_path) as f:
        ds = json.load(f)
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.precision is not None:
        ds.setdefault("bf16", {})["enabled"] = args.precision == "bf16"
        ds.setdefault("fp16", {})["enabled"] = args.precision == "fp16"
    if args.gradient_accumulation_steps is not None:
        ds["gradient_accumulation_steps"] = args.gradient_accumulation_steps
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
    if cfg.get("gradient_accumulation_steps") is not None and \
            args.gradient_accumulation_steps is None:
        ds["gradient_accumulation_steps"] = int(cfg["gradient_accumulation_steps"])
    if cfg.get("learning_rate") is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg["learning_rate"]
        if sched and "warmup_max_lr" in sched.get("params", {}):
            sched["params"]["warmup_max_lr"] = cfg["learning_rate"]
    return cfg, ds


# ----------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """deepspeed.init_distributed, also for a plain ``python uniter_fast/train.py``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op
        # (deepspeed_shm_comm, minutes on a small machine) when the comm backend is
        # created; it only serves inference all-reduce.  Training uses gloo.
        try:
            import deepspeed.ops as ds_ops
            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except (ImportError, AttributeError):
            pass
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size(), acc


# ----------------------------------------------------------------------------- model
def build_model(cfg: Dict[str, Any], meta: Dict[str, Any]):
    from uniter_fast import UniterForPretraining
    mc = cfg["model_config"]
    if not os.path.exists(mc):
        mc = config_path(mc)
    config = UniterConfig(mc)
    img_dim = int(cfg.get("img_dim") or IMG_DIM)
    label_dim = int(cfg.get("img_label_dim") or meta.get("img_label_dim") or IMG_LABEL_DIM)
    if meta["v_range"][1] > config.vocab_size:
        raise ValueError(f"text db vocabulary (v_range {meta['v_range']}) exceeds the model's "
                         f"vocab_size {config.vocab_size}")
    if cfg.get("max_txt_len", 60) + 2 > config.max_position_embeddings:
        raise ValueError(f"max_txt_len {cfg.get('max_txt_len', 60)} + 2 exceeds "
                         f"max_position_embeddings {config.max_position_embeddings}")
    if cfg.get("checkpoint"):
        state = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        model = UniterForPretraining.from_pretrained(config, state, img_dim=img_dim,
                                                     img_label_dim=label_dim)
    else:
        model = UniterForPretraining(config, img_dim=img_dim, img_label_dim=label_dim)
    p = cfg.get("dropout")
    if p is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(p)
    return model


def param_groups(model, weight_decay: float):
    """UNITER's groups: no weight decay on biases and LayerNorm parameters."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    decay, rest = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if any(nd in n for nd in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def compute_loss(model, batch, task: str, itm_ot_lambda: float):
    """UNITER's per-task loss: itm via itm_ot_loss, others the mean of the
    per-element losses.  Returns (loss, extra logs)."""
    from uniter_fast import itm_ot_loss
    out = model(batch, task=task, compute_loss=True)
    if task == "itm":
        itm_loss, ot = out
        loss = itm_ot_loss(itm_loss, ot, itm_ot_lambda)
        extra = {"itm_xe": float(itm_loss.mean().detach())}
        if ot is not None:
            pos, neg = ot
            if pos.numel():
                extra["ot_pos"] = float(pos.mean().detach())
            if neg.numel():
                extra["ot_neg"] = float(neg.mean().detach())
        return loss, extra
    return out.mean(), {}


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(engine, val_loaders, device, world_size: int, zero3: bool) -> Dict[str, float]:
    import torch.distributed as dist
    engine.eval()
    logs = {}
    for name, loader in val_loaders.items():
        task = task_of(name)
        batches = list(loader.epoch_batches(0))
        n = torch.tensor([len(batches)], dtype=torch.long)
        if zero3 and world_size > 1:    # ZeRO-3 forwards are collective: same count on all ranks
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        sums = defaultdict(float)
        for i in range(int(n)):
            if i >= len(batches):
                if batches:
                    engine(move_to_device(batches[-1], device), task=task, compute_loss=False)
                continue
            b = move_to_device(batches[i], device)
            if task == "mlm":
                scores = engine(b, task=task, compute_loss=False).float()
                labels = b["txt_labels"][b["txt_labels"] != -1]
                sums["loss"] += float(F.cross_entropy(scores, labels, reduction="sum"))
                sums["correct"] += float((scores.argmax(-1) == labels).sum())
                sums["n"] += labels.numel()
            elif task == "itm":
                scores, _ = engine(b, task=task, compute_loss=False)
                scores = scores.float()
                sums["loss"] += float(F.cross_entropy(scores, b["targets"], reduction="sum"))
                sums["correct"] += float((scores.argmax(-1) == b["targets"]).sum())
                sums["n"] += b["targets"].numel()
            elif task == "mrfr":
                pred = engine(b, task=task, compute_loss=False).float()
                sums["loss"] += float(F.mse_loss(pred, b["feat_targets"].float(),
                                                 reduction="sum")) / pred.size(-1)
                sums["n"] += pred.size(0)
            else:   # mrc / mrc-kl
                pred = engine(b, task=task, compute_loss=False).float()
                tgt = b["label_targets"].float()
                sums["loss"] += float(F.kl_div(F.log_softmax(pred, -1), tgt, reduction="sum"))
                sums["correct"] += float((pred[:, 1:].argmax(-1) == tgt[:, 1:].argmax(-1)).sum())
                sums["n"] += pred.size(0)
        keys = ["loss", "correct", "n"]
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(t)
        if t[2] > 0:
            logs[f"{name}/loss"] = float(t[0] / t[2])
            if task != "mrfr":
                logs[f"{name}/acc"] = float(t[1] / t[2])
    engine.train()
    return logs


# ----------------------------------------------------------------------------- training
class RunningMean:
    def __init__(self, smooth: float = 0.95):
        self.smooth, self.val = smooth, None

    def __call__(self, x: float) -> None:
        self.val = x if self.val is None else self.smooth * self.val + (1 - self.smooth) * x


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_batch_finite(batch: Dict[str, Any], name: str) -> None:
    for k in ("img_feat", "img_pos_feat", "feat_targets", "label_targets"):
        v = batch.get(k)
        if v is not None and not torch.isfinite(v).all():
            raise ValueError(f"{name}: batch {k} contains NaN or inf")


def _full_state_dict(engine, zero_stage: int) -> Dict[str, torch.Tensor]:
    """This rank's full copy of the module weights (gathered under ZeRO-3)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_arg_parser().parse_args(argv)
    cfg, ds_config = load_configs(args)
    rank, world_size, acc = init_distributed()
    import deepspeed
    import torch.distributed as dist

    if acc.device_name() != "cpu":
        acc.set_device(args.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # small models on a shared CPU: oversubscribed intra-op threads are far slower
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * max(1, local))))
    device = torch.device(acc.device_name(), args.local_rank) if acc.device_name() != "cpu" \
        else torch.device("cpu")
    out_dir = cfg["output_dir"]
    ckpt_dir = os.path.join(out_dir, "ckpt")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if not args.resume and ckpt_lib.read_latest(ckpt_dir) is not None:
            raise ValueError(f"{ckpt_dir} already holds a checkpoint: pass --resume to continue "
                             "it, or choose another --output_dir")
    dist.barrier()
    _set_seed(int(cfg.get("seed", 42)) + rank)

    # data (the synthetic dbs are generated by rank 0 first, then read by all)
    if rank == 0:
        meta = text_meta(cfg)
    dist.barrier()
    if rank != 0:
        meta = text_meta(cfg)
    accum = int(ds_config.get("gradient_accumulation_steps", 1))
    meta_loader = create_train_loader(cfg, rank, world_size, accum_steps=accum)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    val_loaders = create_val_loaders(cfg, rank, world_size)

    # model + engine
    torch.manual_seed(int(cfg.get("seed", 42)))     # same initial weights on every rank
    model = build_model(cfg, meta)
    wd = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd),
                                           config=ds_config)
    fp16 = engine.fp16_enabled()
    _set_seed(int(cfg.get("seed", 42)) + rank)

    global_step = 0
    if args.resume:
        tag, client = ckpt_lib.load_latest(engine, ckpt_dir)
        if tag is not None:
            global_step = int(client["global_step"])
            if client.get("data") is not None:      # None: made by export from-pt
                meta_loader.load_state_dict(client["data"])
            rs = client.get("rng")
            if rs is not None:
                random.setstate(rs["python"])
                np.random.set_state(rs["numpy"])
                torch.set_rng_state(rs["torch"])

    if rank == 0:
        with open(os.path.join(out_dir, "train_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        with open(os.path.join(out_dir, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=1)
    metrics_f = open(os.path.join(out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    rank_f = (open(os.path.join(out_dir, f"metrics_rank{rank}.jsonl"), "a")
              if args.debug_rank_files else None)

    def log(rec):
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    n_steps = int(cfg["num_train_steps"])
    save_steps = int(cfg.get("save_steps") or n_steps)
    valid_steps = int(cfg.get("valid_steps") or n_steps)
    log_steps = int(cfg.get("log_steps") or 1)
    ot_lambda = float(cfg.get("itm_ot_lambda", 0.0))
    pbar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        pbar = tqdm(total=n_steps, initial=global_step, desc="pretrain", dynamic_ncols=True,
                    mininterval=1.0)
    running = defaultdict(RunningMean)
    engine.train()
    if rank == 0:
        log({"event": "start", "step": global_step, "world_size": world_size,
             "zero_stage": zero_stage, "dtype": str(next(engine.module.parameters()).dtype),
             "device": str(device), "resumed": bool(args.resume and global_step > 0)})

    def client_state():
        return {"global_step": global_step, "data": meta_loader.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}

    t_start = time.time()
    t_last, tok_acc, ex_acc = time.time(), 0, 0
    last_val: Dict[str, float] = {}
    micro = 0
    while global_step < n_steps:
        name, batch = meta_loader.next()
        task = task_of(name)
        _check_batch_finite(batch, name)
        batch = move_to_device(batch, device)
        loss, extra = compute_loss(engine, batch, task, ot_lambda)
        if not fp16 and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"step {global_step}: {name} loss is {float(loss)}; "
                                     "stopping before the weights are corrupted")
        engine.backward(loss)
        engine.step()
        micro += 1
        tok_acc += int(batch["attn_masks"].sum())
        ex_acc += int(batch["input_ids"].size(0))
        lval = float(loss.detach())
        running[name](lval)
        if rank_f is not None:
            fp = int(zlib.crc32(batch["input_ids"].cpu().numpy().tobytes()))
            rank_f.write(json.dumps({"micro_step": micro, "step": global_step, "task": name,
                                     "loss": lval, "data_fp": fp,
                                     "lr": float(engine.get_lr()[0]),
                                     "n_examples": int(batch["input_ids"].size(0))}) + "\n")
            rank_f.flush()
        if micro % accum != 0:      # not an optimizer step yet (gradient accumulation)
            continue
        global_step += 1
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix({n.split("_")[0]: f"{m.val:.3f}" for n, m in running.items()},
                             refresh=False)
        if global_step % log_steps == 0 or global_step == n_steps:
            now = time.time()
            rec = {"step": global_step, "task": name, "loss": lval,
                   "lr": float(engine.get_lr()[0]),
                   "tokens_per_s": tok_acc * world_size / max(now - t_last, 1e-9),
                   "examples_per_s": ex_acc * world_size / max(now - t_last, 1e-9),
                   "elapsed_s": now - t_start, **extra}
            gn = engine.get_global_grad_norm()
            if gn is not None:
                rec["grad_norm"] = float(gn)
            if fp16:
                rec["loss_scale"] = float(engine.optimizer.cur_scale) \
                    if hasattr(engine.optimizer, "cur_scale") else None
                rec["skipped_steps"] = int(engine.skipped_steps)
            rec.update({f"running/{n}": m.val for n, m in running.items()})
            log(rec)
            t_last, tok_acc, ex_acc = now, 0, 0
        if global_step % valid_steps == 0 or global_step == n_steps:
            last_val = validate(engine, val_loaders, device, world_size, zero_stage == 3)
            log({"step": global_step, "event": "validation", **last_val})
            if pbar is not None:
                pbar.write(f"step {global_step} validation: " +
                           ", ".join(f"{k}={v:.4f}" for k, v in sorted(last_val.items())))
        if global_step % save_steps == 0 or global_step == n_steps:
            ckpt_lib.save(engine, ckpt_dir, global_step, client_state(),
                          keep=int(cfg.get("keep_checkpoints", 2)))
    if pbar is not None:
        pbar.close()
    if rank_f is not None:
        rank_f.close()
        full = _full_state_dict(engine, zero_stage)
        torch.save(full, os.path.join(out_dir, f"final_weights_rank{rank}.pt"))
    wall = time.time() - t_start
    summary = {"event": "end", "step": global_step, "train_wall_s": wall,
               "skipped_steps": int(engine.skipped_steps) if fp16 else 0,
               "running": {n: m.val for n, m in running.items()}, "validation": last_val}
    log(summary)
    if metrics_f is not None:
        metrics_f.close()
        print(json.dumps({k: v for k, v in summary.items()}, indent=None))
    summary["engine"] = engine
    return summary


if __name__ == "__main__":
    main()
