"""Images in, UNITER region features out: the Python API of the extraction.

>>> from uniter_fast.detector import Extractor
>>> ext = Extractor.from_pretrained("faster_rcnn_from_caffe_attr.pkl")      # or the HF .bin
>>> [rec] = ext(["kitchen.jpg"])
>>> rec["features"].shape, rec["norm_bb"].shape, rec["soft_labels"].shape
((n, 2048), (n, 6), (n, 1601))

Each image gives UNITER's image record (what ``scripts/convert_imgdir.py`` of the original
stores, see :mod:`uniter_fast.data.db`): ``features`` [n, 2048], ``norm_bb`` [n, 6]
(x1, y1, x2, y2, w, h over the image's width and height), ``conf`` [n], ``soft_labels``
[n, 1601] with background at index 0 (UNITER's MRC order; the detector's own is background
last), plus ``obj_ids`` [n] (0-based over the 1600 classes), ``attr_ids`` [n] (0-based over
the 400 attributes), ``boxes`` [n, 4] in pixels and the image's ``height``/``width``.  The n
boxes are the RPN proposals UNITER's rule keeps (confidence > ``conf_th``, at least
``min_bb``, at most ``max_bb``; or a fixed ``num_bb``), by decreasing confidence; the features
are pooled on those proposals, as the original extraction.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..constants import DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB
from .boxes import select_boxes
from .config import DetectorConfig
from .image import ImageSource, PreparedImage, load_image, pad_batch, prepare
from .model import BottomUpDetector, DetectorOutput
from .weights import load_detector

__all__ = ["Extractor", "PRECISIONS", "autocast_dtype", "aspect_batches"]

#: --precision choices and the dtype the convolutions run in (None: float32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def aspect_batches(sizes: Sequence[Sequence[int]], batch_size: int) -> List[List[int]]:
    """Indices grouped ``batch_size`` at a time, images of similar aspect ratio together (the
    padding of a batch stays small)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] / max(sizes[i][1], 1), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class Extractor:
    """The detector and UNITER's box rule.  ``precision``: ``fp32``, ``bf16`` or ``fp16``
    (the convolutions; box arithmetic, softmax and NMS stay float32).  ``num_bb`` set: a fixed
    count (UNITER's ``conf_th = -1``)."""

    def __init__(self, model: BottomUpDetector, *, device: str = "cpu", precision: str = "fp32",
                 conf_th: float = DEFAULT_CONF_TH, max_bb: int = DEFAULT_MAX_BB,
                 min_bb: int = DEFAULT_MIN_BB, num_bb: Optional[int] = None,
                 channels_last: bool = True, fold_norms: bool = True,
                 subgrids: bool = True, roi_chunk: int = 256):
        if num_bb is not None and num_bb < 1:
            raise ValueError(f"num_bb must be >= 1, got {num_bb}")
        if num_bb is None and not 1 <= min_bb <= max_bb:
            raise ValueError(f"need 1 <= min_bb <= max_bb, got min_bb={min_bb}, max_bb={max_bb}")
        if roi_chunk < 1:
            raise ValueError(f"roi_chunk must be >= 1, got {roi_chunk}")
        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision)
        self.precision = precision
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.roi_chunk = roi_chunk
        self.channels_last = bool(channels_last)
        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # speed settings, none of which changes a result: norms folded into the convolutions,
        # res5's dilated convolutions on parity subgrids, channels-last activations
        model = model.fold_norms() if fold_norms else model.unfold_norms()
        model.roi_heads.subgrids = bool(subgrids) and model.cfg.res5_dilation == 2
        self.model = model
        self.cfg: DetectorConfig = model.cfg

    @classmethod
    def from_pretrained(cls, path: str, *, preset: str = "uniter",
                        config: Optional[DetectorConfig] = None, **kwargs: Any) -> "Extractor":
        """An extractor with the weights at ``path`` (either public layout), the ``preset``'s
        image sizes (``"uniter"``: 600/1000, ``"lxmert"``: 800/1333)."""
        base = (config or DetectorConfig()).with_preset(preset)
        return cls(load_detector(path, base), **kwargs)

    # ----------------------------------------------------------------- stages

    def prepare(self, src: ImageSource) -> PreparedImage:
        """Read and preprocess one image (raises :class:`~.image.ImageError`)."""
        return prepare(load_image(src), self.cfg)

    def run(self, images: Sequence[PreparedImage], timings: Optional[Dict[str, float]] = None
            ) -> List[Dict[str, np.ndarray]]:
        """One padded forward over prepared images; one record per image, in order.
        ``timings``: seconds per stage are added (see :meth:`BottomUpDetector.forward`)."""
        if not images:
            return []
        pixels, sizes, scales = pad_batch(images)
        pixels = pixels.to(self.device)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        outs = self.model(pixels, sizes, scales, autocast_dtype=self.dtype,
                          roi_chunk=self.roi_chunk, timings=timings,
                          top_boxes=self.num_bb if self.num_bb is not None else self.max_bb)
        t = time.perf_counter()
        recs = [self.record(o, p) for o, p in zip(outs, images)]
        if timings is not None:
            timings["selection"] = timings.get("selection", 0.0) + time.perf_counter() - t
        return recs

    def record(self, out: DetectorOutput, image: PreparedImage) -> Dict[str, np.ndarray]:
        """UNITER's record of one image from the detector's output (the box rule applied)."""
        if self.num_bb is not None:
            keep = select_boxes(out.conf, -1, 0, self.num_bb)
        else:
            keep = select_boxes(out.conf, self.conf_th, self.min_bb, self.max_bb)
        boxes = out.boxes[keep].float()
        h, w = float(image.height), float(image.width)
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        norm_bb = torch.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w,
                               boxes[:, 3] / h, bw / w, bh / h], dim=1)
        probs = out.cls_probs[keep]
        soft = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)      # background first
        rec = {
            "features": out.features[keep],
            "norm_bb": norm_bb,
            "conf": out.conf[keep],
            "soft_labels": soft,
            "obj_ids": out.obj_ids[keep],
            "boxes": boxes,
        }
        if out.attr_probs is not None:
            rec["attr_ids"] = out.attr_probs[keep].argmax(-1)
        rec = {k: v.detach().cpu().numpy() for k, v in rec.items()}
        for k in ("features", "norm_bb", "conf", "soft_labels", "boxes"):
            rec[k] = rec[k].astype(np.float32)
        rec["height"], rec["width"] = image.height, image.width
        return rec

    # ----------------------------------------------------------------- all at once

    def __call__(self, images: Sequence[ImageSource], batch_size: int = 2
                 ) -> List[Dict[str, np.ndarray]]:
        """Records of ``images`` (paths, bytes, PIL images or RGB arrays), in order;
        ``batch_size`` images of similar aspect ratio per forward."""
        prepared = [self.prepare(s) for s in images]
        out: List[Optional[Dict[str, np.ndarray]]] = [None] * len(prepared)
        for group in aspect_batches([p.size for p in prepared], batch_size):
            for i, rec in zip(group, self.run([prepared[i] for i in group])):
                out[i] = rec
        return out  # type: ignore[return-value]
