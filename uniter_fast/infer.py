"""Inference of a fine-tuned UNITER: the original's result files.

    python -m uniter_fast.infer --task vqa --checkpoint OUTPUT_DIR/ckpt \
        --txt_db data/txt/vqa_test.db --img_db data/img/coco_test2015 [--output results.json]

``--checkpoint`` is a fine-tuning run's DeepSpeed checkpoint directory (its
``ckpt/``, the run directory itself, or one ``global_step<N>`` tag directory;
any ZeRO stage; the run's ``train_config.json`` supplies the model config,
the NLVR2 variant, the box rule, ...) or a plain state dict (``.pt``, e.g. from
``python -m uniter_fast.export to-pt --task ...`` or the original code; give
``--config`` with the training config, or ``--model_config`` and friends).

Writes, as the original scripts do:

* VQA: ``[{"answer": ..., "question_id": ...}, ...]`` JSON (the evaluation
  server's format; ``inf_vqa.py``); ``--save_logits`` also writes the logits
  ``.npz`` (fp16, keyed by question id) as ``inf_vqa.py --save_logits``;
* VE: ``{id: "entailment" | "contradiction" | "neutral"}`` JSON (``train_ve.py``'s
  per-example prediction files; the original has no VE inference script);
* NLVR2: CSV lines ``identifier,True|False`` (``inf_nlvr2.py``).

Default output: ``<run dir>/results_test/results_<tag>_all.{json,csv}`` (for a
``.pt``: next to it).  Batches are token buckets (``--batch_size`` tokens), with
a progress bar; when the db has labels the task metric is printed too (VQA
score, VE accuracy, NLVR2 accuracy and consistency).  One process; on a GPU
machine it runs on the GPU (``--precision`` fp32/bf16/fp16 autocast).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt_lib
from .data.db import TxtTokLmdb
from .data.loader import TaskLoader, move_to_device
from .data.sampler import TokenBucketSampler
from .evaluation import answer_scores, nlvr2_consistency
from .training.config import read_json
from .training.finetune import (
    BUCKET_SIZE,
    NLVR2_MODELS,
    PART2_TASK_NAMES,
    TASK_NAMES,
    build_finetune_model,
    make_task,
)

__all__ = ["main", "run_inference", "resolve_checkpoint", "load_task_model"]

#: the original inf scripts' default batch (tokens)
DEFAULT_BATCH_TOKENS = 8192


def resolve_checkpoint(path: str, tag: Optional[str] = None
                       ) -> Tuple[str, Optional[str], Optional[str], Optional[str]]:
    """``(kind, ckpt_dir or pt file, tag, run dir)``; kind is ``"deepspeed"`` or ``"pt"``."""
    path = os.path.normpath(path)
    if os.path.isfile(path):
        return "pt", path, None, None
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, "ckpt")) and not os.path.exists(
            os.path.join(path, ckpt_lib.LATEST)):
        path = os.path.join(path, "ckpt")               # the run directory
    if os.path.exists(os.path.join(path, ckpt_lib.LATEST)) or tag is not None:
        tag = tag or ckpt_lib.read_latest(path)
        if not os.path.isdir(os.path.join(path, tag)):
            raise ValueError(f"--checkpoint {path}: no checkpoint {tag!r}")
        return "deepspeed", path, tag, os.path.dirname(path)
    if any(f.endswith("model_states.pt") for f in os.listdir(path)):   # one tag directory
        ckpt_dir = os.path.dirname(path)
        return "deepspeed", ckpt_dir, os.path.basename(path), os.path.dirname(ckpt_dir)
    raise ValueError(f"--checkpoint {path}: neither a .pt file nor a DeepSpeed checkpoint "
                     "directory (no 'latest', no ckpt/, no *model_states.pt)")


def _config(args, run_dir: Optional[str]) -> Dict[str, Any]:
    if args.config:
        cfg = read_json(args.config, "training config")
    elif run_dir and os.path.exists(os.path.join(run_dir, "train_config.json")):
        cfg = read_json(os.path.join(run_dir, "train_config.json"), "training config")
    else:
        cfg = {}
    for k in ("model_config", "model", "ans2label", "conf_th", "max_bb", "min_bb", "num_bb",
              "img_dim"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if args.use_img_type is not None:
        cfg["use_img_type"] = args.use_img_type
    if args.compressed_db is not None:
        cfg["compressed_db"] = args.compressed_db
    if not cfg.get("model_config"):
        raise ValueError("no model config: pass --config (the training config) or --model_config")
    if args.task == "nlvr2":
        cfg.setdefault("model", "paired")
        if cfg["model"] not in NLVR2_MODELS:
            raise ValueError(f"NLVR2 model must be one of {NLVR2_MODELS}, got {cfg['model']!r}")
        cfg["use_img_type"] = bool(cfg.get("use_img_type", False))
    return cfg


def load_task_model(task: str, cfg: Dict[str, Any], kind: str, where: str,
                    tag: Optional[str] = None, num_answer: Optional[int] = None):
    """The task model with the checkpoint's weights (strict: every key must match)."""
    if kind == "deepspeed":
        from .export import consolidate
        sd = consolidate(where, tag, fill_tied=False)
    else:
        sd = torch.load(where, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "module" in sd and isinstance(sd["module"], dict):
            sd = sd["module"]
    model = build_finetune_model(task, cfg, None, num_answer)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not fit {type(model).__name__} "
                         f"({cfg.get('model_config')}): missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(sd, strict=True)
    return model


def _ans2label(args, cfg, run_dir) -> Optional[Dict[str, int]]:
    from .data.vqa import load_ans2label
    path = args.ans2label
    if path is None and run_dir and os.path.exists(os.path.join(run_dir, "ckpt",
                                                                "ans2label.json")):
        path = os.path.join(run_dir, "ckpt", "ans2label.json")     # as inf_vqa.py
    return load_ans2label(path or cfg.get("ans2label"))


def run_inference(args) -> Dict[str, Any]:
    kind, where, tag, run_dir = resolve_checkpoint(args.checkpoint, args.tag)
    cfg = _config(args, run_dir)
    task = make_task(args.task)
    if args.task == "nlvr2":
        task._variant, task._use_img_type = cfg["model"], cfg["use_img_type"]
    num_answer = None
    if args.task == "vqa":
        task._ans2label = _ans2label(args, cfg, run_dir)
        task._label2ans = {v: k for k, v in task._ans2label.items()}
        num_answer = len(task._ans2label)
    elif args.task == "ve":
        task.ans2label(cfg)
    model = load_task_model(args.task, cfg, kind, where, tag, num_answer)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()

    from .training.finetune import img_db_for
    txt_db = TxtTokLmdb(args.txt_db, -1)
    dataset = task.dataset(txt_db, img_db_for(args.img_db, cfg), False, 0, 1, 0)
    batch_tokens = int(args.batch_size or cfg.get("val_batch_size") or DEFAULT_BATCH_TOKENS)
    loader = TaskLoader(dataset, task.collate(False),
                        TokenBucketSampler(BUCKET_SIZE, batch_tokens, droplast=False),
                        num_workers=args.n_workers)
    batches = loader.epoch_batches(0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    results: List[Tuple[str, str]] = []
    logits_out: Dict[str, Any] = {}
    sums = {"score": 0.0, "n": 0, "labelled": []}
    pbar = None
    if not args.no_progress:
        from tqdm import tqdm
        pbar = tqdm(total=len(dataset), desc=f"{args.task} inference", unit="ex",
                    dynamic_ncols=True, mininterval=1.0)
    with torch.no_grad():
        for batch in batches:
            qids = batch.pop("qids")
            targets = batch.get("targets")
            batch = move_to_device(batch, device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(batch, compute_loss=False).float()
            preds = task.predict(logits)
            results.extend(zip(qids, preds))
            if args.save_logits:
                for q, row in zip(qids, logits.half().cpu().numpy()):
                    logits_out[str(q)] = row
            if targets is not None:
                if args.task == "nlvr2":
                    correct = [(p == "True") == bool(y) for p, y in zip(preds, targets.tolist())]
                    sums["labelled"].extend(zip(qids, correct))
                    sums["score"] += sum(correct)
                else:
                    sums["score"] += float(answer_scores(logits.cpu(), targets.float()).sum())
                sums["n"] += len(qids)
            if pbar is not None:
                pbar.update(len(qids))
    if pbar is not None:
        pbar.close()
    out = args.output or _default_output(args.task, kind, where, tag, run_dir)
    _write(args.task, out, results)
    summary: Dict[str, Any] = {"task": args.task, "output": out, "n": len(results)}
    if args.save_logits:
        import numpy as np
        lpath = os.path.splitext(out)[0] + "_logits.npz"
        np.savez(lpath, **logits_out)
        summary["logits"] = lpath
    if sums["n"]:
        metric = {"vqa": "score", "ve": "acc", "nlvr2": "acc"}[args.task]
        summary[metric] = sums["score"] / sums["n"]
        if args.task == "nlvr2":
            summary["consistency"] = nlvr2_consistency([q for q, _ in sums["labelled"]],
                                                       [c for _, c in sums["labelled"]])
    return summary


def _default_output(task, kind, where, tag, run_dir) -> str:
    ext = "csv" if task == "nlvr2" else "json"
    if kind == "deepspeed":
        return os.path.join(run_dir, "results_test", f"results_{tag}_all.{ext}")
    base = os.path.splitext(where)[0]
    return f"{base}_results_{task}.{ext}"


def _qid(q: str):
    try:
        return int(q)
    except (TypeError, ValueError):
        return q


def _write(task: str, path: str, results: List[Tuple[str, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        if task == "vqa":
            json.dump([{"answer": a, "question_id": _qid(q)} for q, a in results], f)
        elif task == "ve":
            json.dump({q: a for q, a in results}, f)
        else:
            for q, a in results:
                f.write(f"{q},{a}\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument("--checkpoint", required=True,
                   help="fine-tuning run dir / its ckpt/ / a tag dir, or a plain .pt state dict")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    p.add_argument("--txt_db", required=True, help="text db (UNITER format)")
    p.add_argument("--img_db", required=True, help="image db directory (UNITER format)")
    p.add_argument("--output", default=None, help="result file (default: see above)")
    p.add_argument("--config", default=None,
                   help="training config (default: the run's train_config.json)")
    p.add_argument("--model_config", default=None)
    p.add_argument("--model", default=None, choices=NLVR2_MODELS, help="NLVR2 variant")
    p.add_argument("--use_img_type", default=None, action=argparse.BooleanOptionalAction,
                   help="NLVR2: image type embeddings (the run's setting by default)")
    p.add_argument("--ans2label", default=None, help="VQA answer vocabulary JSON")
    p.add_argument("--conf_th", type=float, default=None)
    p.add_argument("--max_bb", type=int, default=None)
    p.add_argument("--min_bb", type=int, default=None)
    p.add_argument("--num_bb", type=int, default=None)
    p.add_argument("--img_dim", type=int, default=None)
    p.add_argument("--compressed_db", default=None, action=argparse.BooleanOptionalAction,
                   help="image db layout (default: whichever exists)")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"tokens per batch (default: val_batch_size or {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--n_workers", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--save_logits", action="store_true", help="also write the logits (.npz)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    if pre.parse_known_args(argv)[0].task in PART2_TASK_NAMES:   # itm, re, vcr: infer2.py
        from .infer2 import main as main2
        return main2(argv)
    args = build_parser().parse_args(argv)
    summary = run_inference(args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
