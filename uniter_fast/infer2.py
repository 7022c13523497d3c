"""Inference for retrieval (``itm``), referring expressions (``re``) and VCR (``vcr``):
the original's result files.

    python -m uniter_fast.infer --task itm --checkpoint RUN_DIR/ckpt \
        --txt_db data/txt/itm_flickr30k_test.db --img_db data/img/flickr30k/ [--output_dir DIR]

``--checkpoint``: a fine-tuning run's DeepSpeed checkpoint (its ``ckpt/``, the run
directory or one ``global_step<N>`` tag) or a plain state dict (``.pt``); the run's
``train_config.json`` (or ``--config``) gives the model config and box rule.  For
``itm`` a *pretraining* checkpoint works too (zero-shot retrieval: the ITM head's "match"
logit scores the pairs).

* ``itm`` (``inf_itm.py``): the full score matrix with the fast scorer
  (:func:`~uniter_fast.eval.itr.itr_score_matrix`: image/text embeddings once, pairs
  batched by joint length, no per-pair host syncs; progress bar with pairs/s and ETA),
  ``scores.json`` (the recalls of :func:`~uniter_fast.eval.itr.itm_eval`),
  ``results.bin`` (pickled ``(score_matrix, txt_ids, img_ids)``, as the original) and
  ``config.json`` (the options), in ``--output_dir``.  ``--precision bf16`` runs the
  encoder under autocast (GPU).  The checkpoint's own ``rank_output`` is used when it
  has one (the original's ``inf_itm.py`` tested ``'rank_output' not in checkpoint``
  against keys named ``rank_output.weight/bias`` and so always replaced a fine-tuned head
  by the ITM row).
* ``re`` (``inf_re.py``): ``results_{name}_{split}_on_{gt|det}_all.json``, the list of
  ``{"sent_id", "pred_box", "tgt_box"}``; accuracy printed (IoU > 0.5).
* ``vcr`` (``inf_vcr.py``): ``results_{name}_all.json`` (qid -> scores) and, for a test
  db (no labels), the leaderboard CSV ``results_{name}_all.csv``; accuracies printed when
  the db has labels.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from typing import Any, Dict, Optional

import torch

from .data.loader import TaskLoader, move_to_device
from .training.config import read_json

__all__ = ["main", "build_parser", "run_inference2", "TASKS", "load_model"]

TASKS = ("itm", "itm-hn", "re", "vcr")


def _config(args, run_dir: Optional[str]) -> Dict[str, Any]:
    if args.config:
        cfg = read_json(args.config, "training config")
    elif run_dir and os.path.exists(os.path.join(run_dir, "train_config.json")):
        cfg = read_json(os.path.join(run_dir, "train_config.json"), "training config")
    else:
        cfg = {}
    for k in ("model_config", "conf_th", "max_bb", "min_bb", "num_bb", "img_dim"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if args.compressed_db is not None:
        cfg["compressed_db"] = args.compressed_db
    if not cfg.get("model_config"):
        raise ValueError("no model config: pass --config (the training config) or --model_config")
    return cfg


def _state_dict(kind: str, where: str, tag: Optional[str]) -> Dict[str, torch.Tensor]:
    if kind == "deepspeed":
        from .export import consolidate
        sd = consolidate(where, tag, fill_tied=False)
    else:
        sd = torch.load(where, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("module"), dict):
            sd = sd["module"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {where} is not a state dict")
    return sd


def _is_pretraining(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("cls.", "feat_regress.", "region_classifier.")) for k in sd)


def _strict(model, sd, where: str):
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not fit {type(model).__name__}: missing "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(sd, strict=True)
    return model


def load_model(task: str, cfg: Dict[str, Any], kind: str, where: str, tag: Optional[str] = None):
    """(model, zero_shot) with the checkpoint's weights, every key checked."""
    from .training.pretrain import IMG_DIM, load_model_config
    config = load_model_config(cfg)
    img_dim = int(cfg.get("img_dim") or IMG_DIM)
    if task == "itm" and kind == "deepspeed":
        from .export import consolidate
        sd = consolidate(where, tag, fill_tied=False)
        if _is_pretraining(sd):      # the pretraining model's tied weights are needed too
            sd = consolidate(where, tag, fill_tied=True)
    else:
        sd = _state_dict(kind, where, tag)
    if task == "itm":
        if _is_pretraining(sd):
            from .model.pretrain import UniterForPretraining
            heads = [v for k, v in sd.items() if k.startswith("region_classifier.net.")
                     and k.endswith(".weight") and v.dim() == 2]
            label_dim = int(heads[-1].size(0)) if heads else int(cfg.get("img_label_dim")
                                                                or 1601)
            model = UniterForPretraining.from_pretrained(config, sd, img_dim=img_dim,
                                                         img_label_dim=label_dim)
            return model, True
        from .model.itm import UniterForImageTextRetrieval, has_rank_output
        model = UniterForImageTextRetrieval(config, img_dim)
        if not has_rank_output(sd, model):
            raise ValueError(f"checkpoint {where} has no rank_output.weight/bias and is not a "
                             "pretraining checkpoint")
        return _strict(model, sd, where), False
    from .training.finetune2 import build_part2_model
    model = build_part2_model(task, dict(cfg, checkpoint_from="pretrain"), None)
    return _strict(model, sd, where), False


class _Progress:
    """tqdm bar over pairs with pairs/s and ETA (tqdm's own rate and remaining time)."""

    def __init__(self, total: int, enabled: bool, unit: str = "pair"):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, unit_scale=True, dynamic_ncols=True,
                            desc="scoring", file=sys.stderr)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _amp(precision: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _infer_itm(args, cfg, model, device, out_dir) -> Dict[str, Any]:
    from .data.db import TxtTokLmdb
    from .data.itm import ItmEvalDataset
    from .eval.itr import itm_dataset_scores, itm_eval
    from .training.finetune2 import _det_db
    txt = TxtTokLmdb(args.txt_db, -1)
    img = _det_db(args.img_db, cfg)
    n_img = len(set(txt.txt2img[i] for i in txt.id2len))
    ds = ItmEvalDataset(txt, img, min(400, n_img))
    total = len(ds.ids) * len(ds.all_img_ids)
    bar = _Progress(total, not args.no_progress)
    t0 = time.time()
    try:
        scores = itm_dataset_scores(model, ds, max_tokens=int(args.batch_size or 16384),
                                    amp_dtype=_amp(args.precision), progress=bar)
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        bar.close()
    wall = time.time() - t0
    res = itm_eval(scores.float(), ds.ids, ds.all_img_ids, txt.txt2img, ds.img2txts)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(vars(args), f)
    with open(os.path.join(out_dir, "results.bin"), "wb") as f:
        pickle.dump((scores.cpu(), list(ds.ids), list(ds.all_img_ids)), f)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(res, f)
    print("\n".join(f"{'image' if k.startswith('img') else 'text'} retrieval "
                    f"R{k.split('_r')[1]}: {v * 100:.2f}" for k, v in res.items()
                    if k[-1].isdigit()))
    return {"metrics": res, "pairs": total, "pairs_per_s": total / max(wall, 1e-9),
            "wall_s": wall, "output_dir": out_dir}


def _infer_re(args, cfg, model, device, out_dir, name) -> Dict[str, Any]:
    from .data.re import ReTxtTokLmdb, re_eval_collate
    from .eval.re import re_accuracy, re_eval_batch
    from .training.finetune2 import ExampleSampler, ReTask, _re_datasets, is_gt_db
    _, ReEvalDataset = _re_datasets()
    gt = is_gt_db(args.img_db, "coco_gt")
    ds = ReEvalDataset(ReTxtTokLmdb(args.txt_db, -1), ReTask()._img(args.img_db, cfg),
                       use_gt_feat=gt)
    loader = TaskLoader(ds, re_eval_collate, ExampleSampler(int(args.batch_size or 128),
                                                            shuffle=False))
    correct, preds = 0, []
    bar = _Progress(len(ds), not args.no_progress, "sent")
    with torch.no_grad(), _autocast(device, args.precision):
        for b in loader.epoch_batches(0):
            b = move_to_device(b, device)
            c, p = re_eval_batch(model(b, compute_loss=False), b)
            correct, preds = correct + c, preds + p
            bar(len(p))
    bar.close()
    split = os.path.basename(os.path.normpath(args.txt_db)).split("_")[-1].split(".")[0]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"results_{name}_{split}_on_{'gt' if gt else 'det'}_all.json")
    with open(path, "w") as f:
        json.dump(preds, f)
    acc = re_accuracy(correct, len(preds))
    print(f"{split}-acc({'gt' if gt else 'det'}): {acc * 100:.2f}%")
    return {"metrics": {"acc": acc}, "output": path}


def _infer_vcr(args, cfg, model, device, out_dir, name) -> Dict[str, Any]:
    from .data.vcr import VcrEvalDataset, VcrTxtTokLmdb, vcr_eval_collate
    from .eval.vcr import VcrEvaluator, write_vcr_submission
    from .training.finetune2 import ExampleSampler, VcrTask
    txt = VcrTxtTokLmdb(args.txt_db, -1, "qa,qar")
    labelled = txt[next(iter(txt.id2len))]["qa_target"] >= 0
    gt, det = VcrTask()._img_dbs(args.img_db, cfg)
    ds = VcrEvalDataset("val" if labelled else "test", txt, img_db_gt=gt, img_db=det)
    loader = TaskLoader(ds, vcr_eval_collate, ExampleSampler(int(args.batch_size or 10),
                                                             shuffle=False))
    ev = VcrEvaluator()
    bar = _Progress(len(ds), not args.no_progress, "question")
    with torch.no_grad(), _autocast(device, args.precision):
        for b in loader.epoch_batches(0):
            b = move_to_device(b, device)
            ev.update(model(b, compute_loss=False), b)
            bar(len(b["qids"]))
    bar.close()
    os.makedirs(out_dir, exist_ok=True)
    out = {"output": os.path.join(out_dir, f"results_{name}_all.json")}
    with open(out["output"], "w") as f:
        json.dump(ev.results, f)
    if labelled:
        out["metrics"] = ev.metrics(ev.totals())
        print(", ".join(f"{k}: {v:.4f}" for k, v in out["metrics"].items()))
    else:
        out["csv"] = os.path.join(out_dir, f"results_{name}_all.csv")
        write_vcr_submission(ev.results, out["csv"])
    return out


def _autocast(device, precision):
    import contextlib
    dt = _amp(precision)
    return torch.autocast(device.type, dtype=dt) if dt is not None else contextlib.nullcontext()


def run_inference2(args) -> Dict[str, Any]:
    from .infer import resolve_checkpoint
    kind, where, tag, run_dir = resolve_checkpoint(args.checkpoint, args.tag)
    cfg = _config(args, run_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.task == "itm-hn":       # the same model and scorer as itm
        args.task = "itm"
    model, zero_shot = load_model(args.task, cfg, kind, where, tag)
    model.to(device).eval()
    name = tag or os.path.splitext(os.path.basename(where))[0]
    out_dir = args.output_dir or (os.path.join(run_dir, f"results_{args.task}_test")
                                  if run_dir else os.path.dirname(os.path.abspath(where)))
    if args.task == "itm":
        out = _infer_itm(args, cfg, model, device, out_dir)
        out["zero_shot"] = zero_shot
    elif args.task == "re":
        out = _infer_re(args, cfg, model, device, out_dir, name)
    else:
        out = _infer_vcr(args, cfg, model, device, out_dir, name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="UNITER inference: retrieval, RE, VCR")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--checkpoint", required=True,
                   help="DeepSpeed checkpoint dir / run dir / tag dir, or a .pt state dict")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    p.add_argument("--txt_db", required=True, help="text db (UNITER format)")
    p.add_argument("--img_db", required=True,
                   help="image db directory (VCR: 'gt_db;det_db', either or both)")
    p.add_argument("--output_dir", default=None,
                   help="where the result files go (default: RUN_DIR/results_<task>_test)")
    p.add_argument("--config", default=None, help="training config (default: the run's)")
    p.add_argument("--model_config", default=None)
    p.add_argument("--conf_th", type=float, default=None)
    p.add_argument("--max_bb", type=int, default=None)
    p.add_argument("--min_bb", type=int, default=None)
    p.add_argument("--num_bb", type=int, default=None)
    p.add_argument("--img_dim", type=int, default=None)
    p.add_argument("--compressed_db", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--batch_size", type=int, default=None,
                   help="itm: tokens per scorer batch (16384); re/vcr: examples per batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = run_inference2(args)
    print(json.dumps({k: v for k, v in out.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
