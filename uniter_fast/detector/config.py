"""The bottom-up-attention detector's shape and test-time settings.

:class:`DetectorConfig` describes the network (ResNet C4 depth and widths, RPN anchors, the RoI
head, the class and attribute counts) and the test-time settings (image size, RPN proposal
counts, NMS thresholds, the box regression weights).  The network part is read off a weights
file (:func:`uniter_fast.detector.weights.load_detector` infers it), so a user never writes one
for the public Visual Genome checkpoints; the settings part has two presets:

* ``"uniter"`` (default): UNITER's extraction, the original caffe ``generate_npz.py`` /
  ``generate_tsv.py``: shorter side 600, longer side at most 1000, 300 RPN proposals;
* ``"lxmert"``: the Hugging Face LXMERT demo's 800 / 1333;
* ``"small"``: shorter side 300, longer at most 500, 100 proposals: quick tries (the
  walk-through's generated detector), not UNITER's features.

The numbers are the Visual Genome model's (py-bottom-up-attention's
``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml``, the caffe ``test.prototxt``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

__all__ = ["DetectorConfig", "PRESETS", "VG_PIXEL_MEAN_BGR"]

#: the caffe model's pixel mean, BGR order (images are fed BGR, 0..255, minus this mean)
VG_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

#: ResNet blocks per stage (res2, res3, res4) by depth; res5 (the RoI head) has 3 at every depth
RESNET_BLOCKS = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}


@dataclass(frozen=True)
class DetectorConfig:
    # ---------------------------------------------------------------- network
    #: bottleneck blocks of res2, res3, res4 (the backbone) and of res5 (the RoI head)
    blocks: Tuple[int, int, int] = RESNET_BLOCKS[101]
    res5_blocks: int = 3
    stem_channels: int = 64
    #: output channels of res2 (res3/res4/res5: 2x, 4x, 8x)
    res2_channels: int = 256
    #: bottleneck width of res2 (doubles per stage)
    bottleneck_channels: int = 64
    #: caffe's stem max pool: kernel 3, stride 2, no padding, ceil mode
    caffe_maxpool: bool = True
    #: res5 in the RoI head keeps stride 1 and uses dilation 2 (the VG model; "RES5HALVE: False")
    res5_dilation: int = 2
    norm_eps: float = 1e-5
    rpn_channels: int = 512
    anchor_sizes: Tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    #: stride of res4 (the RPN's and the RoI pooling's feature map)
    feature_stride: int = 16
    pool_size: int = 14
    num_classes: int = 1600
    num_attrs: int = 400
    # ---------------------------------------------------------------- test-time settings
    pixel_mean: Tuple[float, float, float] = VG_PIXEL_MEAN_BGR
    min_size: int = 600
    max_size: int = 1000
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms: float = 0.7
    rpn_min_box: float = 0.0
    #: per-class NMS of the box selection (the original extraction's cfg.TEST.NMS)
    class_nms: float = 0.3
    bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    rpn_reg_weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    #: largest log-scale a box delta may apply (detectron2: a 16-pixel box grows to 1000 at most)
    scale_clamp: float = field(default=math.log(1000.0 / 16))

    def __post_init__(self):
        problems = []
        if len(self.blocks) != 3 or any(int(b) < 1 for b in self.blocks):
            problems.append(f"blocks must be 3 positive counts (res2..res4), got {self.blocks}")
        for name in ("res5_blocks", "stem_channels", "res2_channels", "bottleneck_channels",
                     "rpn_channels", "feature_stride", "pool_size", "num_classes", "min_size",
                     "max_size", "rpn_pre_nms_topk", "rpn_post_nms_topk"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attrs < 0:
            problems.append(f"num_attrs must be >= 0, got {self.num_attrs}")
        if self.res5_dilation not in (1, 2):
            problems.append(f"res5_dilation must be 1 or 2, got {self.res5_dilation}")
        if self.min_size > self.max_size:
            problems.append(f"min_size {self.min_size} > max_size {self.max_size}")
        for name in ("rpn_nms", "class_nms"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if problems:
            raise ValueError("DetectorConfig: " + "; ".join(problems))

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def res4_channels(self) -> int:
        return self.res2_channels * 4

    @property
    def res5_channels(self) -> int:
        """Width of a region feature (2048 for the VG model: UNITER's ``img_dim``)."""
        return self.res2_channels * 8

    @property
    def label_dim(self) -> int:
        """Classes of a soft label, background included (1601: UNITER's ``img_label_dim``)."""
        return self.num_classes + 1

    def replace(self, **changes: Any) -> "DetectorConfig":
        return dataclasses.replace(self, **changes)

    def with_preset(self, name: str) -> "DetectorConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown detector preset {name!r}; known: {sorted(PRESETS)}")
        return self.replace(**PRESETS[name])

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


#: test-time settings: UNITER's caffe extraction, and the Hugging Face LXMERT demo
PRESETS: Dict[str, Dict[str, Any]] = {
    "uniter": {"min_size": 600, "max_size": 1000},
    "lxmert": {"min_size": 800, "max_size": 1333},
    "small": {"min_size": 300, "max_size": 500, "rpn_post_nms_topk": 100},
}
