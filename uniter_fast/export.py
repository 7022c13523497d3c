"""Convert between DeepSpeed checkpoints and plain UNITER state dicts.

    python -m uniter_fast.export to-pt OUTPUT_DIR/ckpt model.pt [--tag global_step400]
    python -m uniter_fast.export from-pt model.pt NEW_OUTPUT_DIR/ckpt \
        [--config train.json] [--deepspeed_config ds.json]

``to-pt`` writes an fp32 ``state_dict`` with exactly the original UNITER key
names (both tied weights present), loadable by the original code's
``UniterForPretraining`` with ``strict=True``.  ZeRO-1/2/3 checkpoints are
consolidated from their fp32 partitions; ZeRO-0 from the module weights.

``from-pt`` builds a single-process DeepSpeed checkpoint (tag
``global_step0``) from a state dict; continue it with ``train.py --resume``
at world size 1.  To start multi-rank training from a .pt file, set the
training config's ``checkpoint`` instead (UNITER's way).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, Optional

import torch

from . import checkpoint as ckpt_lib

# tied weights: (key that may be missing in a checkpoint, key it is tied to)
TIED = (("cls.predictions.decoder.weight", "uniter.embeddings.word_embeddings.weight"),
        ("feat_regress.weight", "uniter.img_embeddings.img_linear.weight"))


def _fill_tied(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for a, b in TIED:
        if a not in sd and b in sd:
            sd[a] = sd[b]
        elif b not in sd and a in sd:
            sd[b] = sd[a]
    return sd


def consolidate(ckpt_dir: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint (any ZeRO stage)."""
    tag = tag or ckpt_lib.read_latest(ckpt_dir)
    if tag is None:
        raise ValueError(f"{ckpt_dir}: no 'latest' file; pass --tag")
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ValueError(f"checkpoint {tag_dir} does not exist")
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")) and \
            not glob.glob(os.path.join(tag_dir, "mp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:
        files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise ValueError(f"{tag_dir} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        sd = state["module"]
    sd = {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
          for k, v in sd.items()}
    return _fill_tied(sd)


def to_pt(ckpt_dir: str, out_path: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    sd = consolidate(ckpt_dir, tag)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"checkpoint weight {k} contains NaN or inf; refusing to export")
    tmp = out_path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, out_path)
    return sd


def from_pt(pt_path: str, ckpt_dir: str, config: Optional[str] = None,
            deepspeed_config: Optional[str] = None) -> str:
    """Write a world-size-1 DeepSpeed checkpoint holding the weights of ``pt_path``."""
    from . import train
    args = ["--output_dir", os.path.dirname(os.path.abspath(ckpt_dir.rstrip("/"))),
            "--num_train_steps", "1"]
    if config:
        args += ["--config", config]
    if deepspeed_config:
        args += ["--deepspeed_config", deepspeed_config]
    targs = train.build_arg_parser().parse_args(args)
    cfg, ds = train.load_configs(targs)
    cfg["checkpoint"] = None
    train.init_distributed()
    import deepspeed
    import torch.distributed as dist
    if dist.get_world_size() != 1:
        raise ValueError("from-pt runs in a single process")
    meta = train.text_meta(cfg)
    model = train.build_model(cfg, meta)
    sd = _fill_tied(torch.load(pt_path, map_location="cpu", weights_only=True))
    own = set(model.state_dict())
    missing, unexpected = own - set(sd), set(sd) - own
    if missing or unexpected:
        raise ValueError(f"{pt_path} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    model.load_state_dict(sd, strict=True)
    wd = ds.get("optimizer", {}).get("params", {}).get("weight_decay", 0.01)
    engine, _, _, _ = deepspeed.initialize(model=model,
                                           model_parameters=train.param_groups(model, wd),
                                           config=ds)
    os.makedirs(ckpt_dir, exist_ok=True)
    if ckpt_lib.read_latest(ckpt_dir) is not None:
        raise ValueError(f"{ckpt_dir} already holds a checkpoint")
    return ckpt_lib.save(engine, ckpt_dir, 0, {"global_step": 0, "data": None, "rng": None})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-pt", help="DeepSpeed checkpoint dir -> plain state dict (.pt)")
    a.add_argument("ckpt_dir")
    a.add_argument("out")
    a.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    b = sub.add_parser("from-pt", help="plain state dict (.pt) -> DeepSpeed checkpoint dir")
    b.add_argument("pt")
    b.add_argument("ckpt_dir")
    b.add_argument("--config", default=None, help="training config (model_config etc.)")
    b.add_argument("--deepspeed_config", default=None)
    args = p.parse_args(argv)
    if args.cmd == "to-pt":
        sd = to_pt(args.ckpt_dir, args.out, args.tag)
        print(f"wrote {args.out}: {len(sd)} tensors, "
              f"{sum(v.numel() for v in sd.values())} values")
    else:
        tag = from_pt(args.pt, args.ckpt_dir, args.config, args.deepspeed_config)
        print(f"wrote {args.ckpt_dir}/{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
