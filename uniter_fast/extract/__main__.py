"""``python -m uniter_fast.extract``: images to UNITER's image db with the bottom-up-attention
detector.

    python -m uniter_fast.extract --detector faster_rcnn_from_caffe_attr.pkl \\
        --images IMAGE_DIR_OR_LIST --out IMG_DB [--prefix coco_train2014_] \\
        [--conf_th 0.2 --max_bb 100 --min_bb 10 | --num_bb 36] [--batch_size 2] \\
        [--precision fp32|bf16|fp16] [--workers 2] [--overwrite] [--no_progress]

    torchrun --nproc_per_node 8 -m uniter_fast.extract ...     # one shard per rank

``--images`` is a folder (walked recursively) or a text file listing one image path per line.
Each image's key is ``--prefix`` + its file stem + ``.npz`` (UNITER's names).  The db is
resumable: rerun the same command after an interruption.  Hidden options for small tests:
``--min_size``/``--max_size`` override the preset's image sizes.

Exit status: 0 when the db is written (images that failed are listed in ``OUT/failed.tsv``)
or was already complete; 1 when nothing could be extracted or the ranks could not finish;
2 for bad options, inputs or settings that differ from an earlier run's.
"""
from __future__ import annotations

import argparse
import sys

from ..constants import DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB
from ..detector.config import PRESETS
from ..detector.extractor import PRECISIONS
from . import ExtractError, ExtractOptions, RankWaitError, WeightsError, extract


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uniter_fast.extract",
                                description="Images to UNITER's image db with the "
                                "bottom-up-attention detector.",
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", required=True,
                   help="detector weights: faster_rcnn_from_caffe_attr.pkl (detectron2) or "
                        "pytorch_model.bin (Hugging Face unc-nlp/frcnn-vg-finetuned), or a "
                        "folder holding one")
    p.add_argument("--images", required=True,
                   help="a folder of images (recursive) or a text file with one image path "
                        "per line (relative to the file's folder; # comments)")
    p.add_argument("--out", required=True, help="the image db directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="uniter",
                   help="image sizes: uniter 600/1000 (UNITER's extraction), lxmert 800/1333, "
                        "small 300/500 with 100 proposals (quick tries)")
    p.add_argument("--conf_th", type=float, default=None,
                   help=f"keep boxes of confidence > conf_th (default {DEFAULT_CONF_TH})")
    p.add_argument("--max_bb", type=int, default=None,
                   help=f"at most this many boxes (default {DEFAULT_MAX_BB})")
    p.add_argument("--min_bb", type=int, default=None,
                   help=f"at least this many boxes (default {DEFAULT_MIN_BB})")
    p.add_argument("--num_bb", type=int, default=None,
                   help="a fixed number of boxes per image instead (UNITER's conf_th -1 "
                        "layout, feat_numbb{N}_compressed)")
    p.add_argument("--prefix", default="", help="image key prefix, e.g. coco_train2014_ "
                                                "or nlvr2_")
    p.add_argument("--batch_size", type=int, default=2,
                   help="images per forward (similar aspect ratios together; default 2)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="the convolutions' precision (default fp32)")
    p.add_argument("--device", default=None,
                   help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers reading and preprocessing images, one thread each "
                        "(default 2; 0: in the main process)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild the db even if it is finished or from other settings")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar (a progress line every minute instead)")
    p.add_argument("--wait_timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks to finish (default 6 h)")
    p.add_argument("--min_size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max_size", type=int, default=None, help=argparse.SUPPRESS)
    return p


def options(args: argparse.Namespace) -> ExtractOptions:
    if args.num_bb is not None:
        given = [f"--{n}" for n in ("conf_th", "max_bb", "min_bb")
                 if getattr(args, n) is not None]
        if given:
            raise ExtractError(f"--num_bb (a fixed box count) excludes {', '.join(given)} "
                               "(the confidence rule); give one or the other")
    return ExtractOptions(
        detector=args.detector, images=args.images, out=args.out, preset=args.preset,
        conf_th=DEFAULT_CONF_TH if args.conf_th is None else args.conf_th,
        max_bb=DEFAULT_MAX_BB if args.max_bb is None else args.max_bb,
        min_bb=DEFAULT_MIN_BB if args.min_bb is None else args.min_bb,
        num_bb=args.num_bb, prefix=args.prefix, batch_size=args.batch_size,
        precision=args.precision, device=args.device, workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress, min_size=args.min_size,
        max_size=args.max_size, wait_timeout=args.wait_timeout)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = extract(options(args))
    except WeightsError as e:
        print(f"error: --detector: {e}", file=sys.stderr)
        return 2
    except RankWaitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ExtractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the images committed so far are kept; rerun the same command to "
              "go on", file=sys.stderr)
        return 130
    print(summary.describe(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
