"""A detector with generated weights, written in the Hugging Face layout
(``pytorch_model.bin``), for trying the whole pipeline without the public weights:

    python -m uniter_fast.detector.generated --out demo/detector

The network is the bottom-up-attention detector's structure made small (one bottleneck per
stage, narrow bottlenecks) but with UNITER's interface widths: 2048-d region features and
1600 classes + background, so its image dbs plug into UNITER models and configs unchanged
(``img_dim`` 2048, ``img_label_dim`` 1601).  Its weights are random (seeded): the boxes and
features mean nothing; they show the mechanics.  A few hundred ms per image on a laptop CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from .config import DetectorConfig
from .model import BottomUpDetector
from .weights import ANCHORS_KEY

__all__ = ["SMALL_NETWORK", "generated_detector", "save_hf_layout", "main"]

#: the small network: one bottleneck per stage, UNITER's feature width and classes
SMALL_NETWORK = dict(blocks=(1, 1, 1), res5_blocks=1, stem_channels=16, res2_channels=256,
                     bottleneck_channels=8, rpn_channels=32, num_classes=1600, num_attrs=400)


def generated_detector(seed: int = 0, **network) -> BottomUpDetector:
    """A detector of ``network`` (default :data:`SMALL_NETWORK`) with seeded random weights
    whose activations stay finite and whose proposals spread over the image."""
    cfg = DetectorConfig(**(network or SMALL_NETWORK))
    gen = torch.Generator().manual_seed(seed)
    model = BottomUpDetector(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
            elif name.endswith("norm.bias") or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        for name, m in model.named_modules():
            if name.endswith("conv3"):
                m.norm.weight.mul_(0.2)           # damped residual branches
        model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(0.02)
        model.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
    return model.eval()


def save_hf_layout(model: BottomUpDetector, path: str) -> str:
    """Write ``model`` as the Hugging Face demo's ``pytorch_model.bin`` (detectron2 names, the
    cell anchors as ``...cell_anchors.0``); ``path`` a file or a directory.  Returns the file."""
    if os.path.isdir(path) or not path.endswith((".bin", ".pt", ".pth")):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "pytorch_model.bin")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd[ANCHORS_KEY] = sd.pop("proposal_generator.anchor_generator.cell_anchors")
    tmp = path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uniter_fast.detector.generated",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True,
                    help="a directory (pytorch_model.bin is written into it) or a .bin path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing file")
    a = ap.parse_args(argv)
    target = (os.path.join(a.out, "pytorch_model.bin")
              if os.path.isdir(a.out) or not a.out.endswith((".bin", ".pt", ".pth")) else a.out)
    if os.path.exists(target) and not a.overwrite:
        print(f"{target} exists; --overwrite to replace it", file=sys.stderr)
        return 2
    path = save_hf_layout(generated_detector(a.seed), a.out)
    print(f"wrote {path}: a small bottom-up-attention detector with generated weights "
          "(2048-d features, 1600 classes; random: for trying the pipeline, not for use)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
