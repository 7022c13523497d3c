"""The bottom-up-attention Faster R-CNN (Anderson et al. 2018) in plain PyTorch.

ResNet C4 with a caffe stem (7x7 conv, max pool 3/2 without padding in ceil mode; stride in
the 1x1 convs), an RPN on res4, RoIPool 14x14 on res4, res5 as the RoI head (stride 1,
dilation 2 in the Visual Genome model) mean-pooled to the region feature, a class head
(1600 classes + background, background LAST as in the weights files), class-specific box
deltas and the attribute head (400 attributes + "none", fed the class embedding of the
arg-max class).  Module and parameter names are those of the public weights
(detectron2's: ``backbone.res4.22.conv2.norm.running_var``, ``roi_heads.box_predictor...``),
so a weights file maps onto :meth:`BottomUpDetector.state_dict` key for key.

Several images run as one padded batch with the same results as one at a time: the padded
region is zeroed before every spatial convolution and pooling (as a lone image's zero
padding), and the RPN reads each image's own feature grid.  The detector uses
:func:`uniter_fast.ops.nms` and :func:`uniter_fast.ops.roi_pool` only (plain-PyTorch
reference backend everywhere, torchvision's where it imports).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .boxes import apply_deltas, cell_anchors, class_nms_max_conf, clip_boxes, grid_anchors
from .config import DetectorConfig

__all__ = ["BottomUpDetector", "DetectorOutput", "FrozenNorm", "ConvNorm"]


class FrozenNorm(nn.Module):
    """A frozen batch norm: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
        return scale, self.bias.float() - self.running_mean.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by a :class:`FrozenNorm` (``.norm``), as detectron2
    names them.  :meth:`fold` folds the norm into the convolution's weight and bias for
    inference (same function, one pass over memory fewer)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0,
                 dilation: int = 1, eps: float = 1e-5):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                         bias=False)
        self.norm = FrozenNorm(cout, eps)
        self._folded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def fold(self) -> None:
        scale, shift = self.norm.scale_shift()
        w = (self.weight.float() * scale[:, None, None, None]).to(self.weight.dtype)
        self._folded = (w.contiguous(memory_format=_memory_format(self.weight)),
                        shift.to(self.weight.dtype))

    def unfold(self) -> None:
        self._folded = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.padding, self.dilation)

    def forward_undilated(self, x: torch.Tensor) -> torch.Tensor:
        """The same kernel with dilation 1 and padding ``(k - 1) / 2`` (on parity subgrids)."""
        return self._run(x, tuple((k - 1) // 2 for k in self.kernel_size), 1)

    def _run(self, x: torch.Tensor, padding, dilation) -> torch.Tensor:
        if self._folded is not None:
            w, b = self._folded
            return F.conv2d(x, w, b, self.stride, padding, dilation)
        return self.norm(F.conv2d(x, self.weight, None, self.stride, padding, dilation))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
              ceil: bool = False) -> int:
    size = max(size, dilation * (kernel - 1) + 1 - 2 * padding) if ceil else size
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:
        out -= 1   # PyTorch's ceil mode: the last window starts inside the input
    return out


class _Valid:
    """Each image's valid (h, w) in a padded batch, and a mask that zeroes the rest (None
    when nothing is padded)."""

    def __init__(self, sizes: List[Tuple[int, int]], height: int, width: int):
        self.sizes, self.height, self.width = sizes, height, width
        self.padded = any(h != height or w != width for h, w in sizes)
        self._mask: Optional[torch.Tensor] = None

    def after(self, kernel: int, stride: int, padding: int, dilation: int = 1,
              ceil: bool = False) -> "_Valid":
        f = lambda s: _conv_out(s, kernel, stride, padding, dilation, ceil)  # noqa: E731
        return _Valid([(f(h), f(w)) for h, w in self.sizes], f(self.height), f(self.width))

    def zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return x
        if self._mask is None or self._mask.device != x.device or self._mask.dtype != x.dtype:
            m = torch.zeros(len(self.sizes), 1, self.height, self.width, dtype=x.dtype,
                            device=x.device)
            for i, (h, w) in enumerate(self.sizes):
                m[i, :, :h, :w] = 1
            self._mask = m
        return x * self._mask


class Bottleneck(nn.Module):
    """ResNet bottleneck, stride in the first 1x1 conv (the MSRA/caffe ResNet)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, dilation: int, eps: float):
        super().__init__()
        self.stride, self.dilation = stride, dilation
        self.shortcut = (ConvNorm(cin, cout, 1, stride=stride, eps=eps)
                         if cin != cout or stride != 1 else None)
        self.conv1 = ConvNorm(cin, mid, 1, stride=stride, eps=eps)
        self.conv2 = ConvNorm(mid, mid, 3, padding=dilation, dilation=dilation, eps=eps)
        self.conv3 = ConvNorm(mid, cout, 1, eps=eps)

    def forward(self, x: torch.Tensor, valid: Optional[_Valid] = None,
                subgrids: bool = False) -> torch.Tensor:
        """``subgrids``: ``x`` holds the 2x2 parity subgrids of the maps (see
        :meth:`RoIHeads.pooled_features`): the dilation-2 3x3 conv is then a plain 3x3 conv."""
        out = F.relu_(self.conv1(x))
        if valid is not None and self.stride != 1:
            valid = valid.after(1, self.stride, 0)
        if valid is not None:
            out = valid.zero_padding(out)
        out = F.relu_(self.conv2.forward_undilated(out) if subgrids else self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class Stage(nn.Sequential):
    def forward(self, x: torch.Tensor, valid: Optional[_Valid] = None,
                subgrids: bool = False) -> torch.Tensor:
        for block in self:
            x = block(x, valid, subgrids)
            if valid is not None and block.stride != 1:
                valid = valid.after(1, block.stride, 0)
        return x


def _stage(n: int, cin: int, mid: int, cout: int, stride: int, dilation: int,
           eps: float) -> Stage:
    blocks = [Bottleneck(cin, mid, cout, stride, dilation, eps)]
    blocks += [Bottleneck(cout, mid, cout, 1, dilation, eps) for _ in range(n - 1)]
    return Stage(*blocks)


class Stem(nn.Module):
    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.caffe_maxpool = cfg.caffe_maxpool
        self.conv1 = ConvNorm(3, cfg.stem_channels, 7, stride=2, padding=3, eps=cfg.norm_eps)

    def pool_args(self) -> Tuple[int, int, int, bool]:
        return (3, 2, 0, True) if self.caffe_maxpool else (3, 2, 1, False)

    def forward(self, x: torch.Tensor, valid: Optional[_Valid] = None) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if valid is not None:
            x = valid.after(7, 2, 3).zero_padding(x)
        k, s, p, ceil = self.pool_args()
        short_h, short_w = max(0, k - x.shape[2]), max(0, k - x.shape[3])
        if short_h or short_w:
            # a map smaller than the window: one output, the max over what there is (zeros
            # added after a ReLU change no maximum)
            x = F.pad(x, (0, short_w, 0, short_h))
        return F.max_pool2d(x, k, s, p, ceil_mode=ceil)


class Backbone(nn.Module):
    """The stem and res2..res4 (stride 16): ``backbone.*`` of the weights."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        eps = cfg.norm_eps
        self.stem = Stem(cfg)
        c2, m2 = cfg.res2_channels, cfg.bottleneck_channels
        self.res2 = _stage(cfg.blocks[0], cfg.stem_channels, m2, c2, 1, 1, eps)
        self.res3 = _stage(cfg.blocks[1], c2, m2 * 2, c2 * 2, 2, 1, eps)
        self.res4 = _stage(cfg.blocks[2], c2 * 2, m2 * 4, c2 * 4, 2, 1, eps)

    def forward(self, x: torch.Tensor, valid: Optional[_Valid] = None
                ) -> Tuple[torch.Tensor, Optional[_Valid]]:
        x = self.stem(x, valid)
        if valid is not None:
            valid = valid.after(7, 2, 3)
            k, s, p, ceil = self.stem.pool_args()
            valid = valid.after(k, s, p, ceil=ceil)
        x = self.res2(x, valid)
        x = self.res3(x, valid)
        if valid is not None:
            valid = valid.after(1, 2, 0)
        x = self.res4(x, valid)
        if valid is not None:
            valid = valid.after(1, 2, 0)
            x = valid.zero_padding(x)
        return x, valid


class AnchorGenerator(nn.Module):
    """The RPN's cell anchors (``cell_anchors``: [A, 4]); the Hugging Face weights store
    them (``proposal_generator.anchor_generator.cell_anchors.0``), detectron2's pkl does not
    (they are generated from the config, the same way)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.register_buffer("cell_anchors", cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios))


class RPNHead(nn.Module):
    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        a = cfg.num_anchors
        self.conv = nn.Conv2d(cfg.res4_channels, cfg.rpn_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(cfg.rpn_channels, a, 1)
        self.anchor_deltas = nn.Conv2d(cfg.rpn_channels, a * 4, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """``proposal_generator.*``: the proposals of each image, in its resized pixels."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.rpn_head = RPNHead(cfg)
        self.anchor_generator = AnchorGenerator(cfg)

    def forward(self, feats: torch.Tensor, grids: Sequence[Tuple[int, int]],
                image_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        cfg = self.cfg
        logits, deltas = self.rpn_head(feats)
        cells = self.anchor_generator.cell_anchors
        a = cells.shape[0]
        out = []
        for i, ((gh, gw), (ih, iw)) in enumerate(zip(grids, image_sizes)):
            lg = logits[i, :, :gh, :gw].permute(1, 2, 0).reshape(-1).float()     # (y, x, a)
            dl = deltas[i, :, :gh, :gw].reshape(a, 4, gh, gw).permute(2, 3, 0, 1) \
                .reshape(-1, 4).float()
            k = min(cfg.rpn_pre_nms_topk, lg.numel())
            top = torch.sort(lg, descending=True, stable=True).indices[:k]
            anchors = grid_anchors(cells, gh, gw, cfg.feature_stride)[top]
            boxes = apply_deltas(dl[top], anchors, cfg.rpn_reg_weights, cfg.scale_clamp)
            boxes = clip_boxes(boxes, ih, iw)
            scores = lg[top]
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            ok = (w > cfg.rpn_min_box) & (h > cfg.rpn_min_box)
            boxes, scores = boxes[ok], scores[ok]
            keep = ops.nms(boxes, scores, cfg.rpn_nms)[:cfg.rpn_post_nms_topk]
            out.append(boxes[keep])
        return out


class BoxPredictor(nn.Module):
    """``roi_heads.box_predictor.*``: class scores (background last), class-specific box
    deltas, and the attribute head fed the arg-max class's embedding."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        d = cfg.res5_channels
        self.cls_score = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_pred = nn.Linear(d, cfg.num_classes * 4)
        self.has_attrs = cfg.num_attrs > 0
        if self.has_attrs:
            self.cls_embedding = nn.Embedding(cfg.num_classes + 1, d // 8)
            self.fc_attr = nn.Linear(d + d // 8, d // 4)
            self.attr_score = nn.Linear(d // 4, cfg.num_attrs + 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Class logits [R, C + 1] and attribute logits [R, A + 1] (None without the head)."""
        logits = self.cls_score(x)
        if not self.has_attrs:
            return logits, None
        emb = self.cls_embedding(logits.argmax(-1))
        attr = self.attr_score(F.relu(self.fc_attr(torch.cat([x, emb.to(x.dtype)], -1))))
        return logits, attr


class RoIHeads(nn.Module):
    """``roi_heads.*``: RoIPool on res4, res5, mean pooling, the predictors."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        c4, c5 = cfg.res4_channels, cfg.res5_channels
        mid = cfg.bottleneck_channels * 8
        stride = 1 if cfg.res5_dilation == 2 else 2
        self.res5 = _stage(cfg.res5_blocks, c4, mid, c5, stride, cfg.res5_dilation,
                           cfg.norm_eps)
        self.box_predictor = BoxPredictor(cfg)
        #: run a dilation-2 res5 on parity subgrids (same result; set False to compare)
        self.subgrids = cfg.res5_dilation == 2

    def pooled_features(self, feats: torch.Tensor, rois: torch.Tensor,
                        chunk: int) -> torch.Tensor:
        """Region features [R, C5] of ``rois`` [R, 5] (batch index, x1, y1, x2, y2), float32,
        ``chunk`` RoIs at a time through res5."""
        out = []
        for start in range(0, rois.shape[0], chunk):
            x = ops.roi_pool(feats, rois[start:start + chunk], self.cfg.pool_size,
                             1.0 / self.cfg.feature_stride)
            n, c, h, w = x.shape
            sub = self.subgrids and h % 2 == 0 and w % 2 == 0
            if sub:
                # a dilation-2 conv only mixes pixels of one row/column parity: run res5 on
                # the four parity subgrids as a batch of 4n maps with plain 3x3 convs (exactly
                # the same sums, a faster convolution than the dilated one)
                x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4) \
                    .reshape(n * 4, c, h // 2, w // 2)
            if feats.is_contiguous(memory_format=torch.channels_last) and n > 0:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.res5(x, None, sub).float()
            out.append(y.reshape(n, 4, -1, h // 2, w // 2).mean(dim=(1, 3, 4)) if sub
                       else y.mean(dim=(2, 3)))
        if not out:
            return feats.new_zeros(0, self.cfg.res5_channels, dtype=torch.float32)
        return torch.cat(out)


@dataclass
class DetectorOutput:
    """One image's detections, every proposal (in the RPN's order), on the model's device.

    ``boxes`` [R, 4] the proposals in the input image's pixels (divided by the resize scale),
    ``features`` [R, C5] float32, ``cls_probs`` [R, C + 1] (background LAST, as the model),
    ``attr_probs`` [R, A] (the "no attribute" column dropped, renormalised; None without the
    head), ``conf`` [R] (the per-class-NMS confidence of the original extraction),
    ``obj_ids`` [R] (the class, 0-based over the C classes, whose kept score is ``conf``).
    """
    boxes: torch.Tensor
    features: torch.Tensor
    cls_probs: torch.Tensor
    attr_probs: Optional[torch.Tensor]
    conf: torch.Tensor
    obj_ids: torch.Tensor


class BottomUpDetector(nn.Module):
    """The whole detector: ``backbone``, ``proposal_generator``, ``roi_heads`` (weights
    names).  :meth:`forward` takes a padded batch of preprocessed images (BGR minus the pixel
    mean, see :mod:`uniter_fast.detector.image`)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.proposal_generator = RPN(cfg)
        self.roi_heads = RoIHeads(cfg)

    def fold_norms(self) -> "BottomUpDetector":
        """Fold every frozen norm into its convolution (inference; call again after moving or
        casting the model, or after loading weights)."""
        for m in self.modules():
            if isinstance(m, ConvNorm):
                m.fold()
        return self

    def unfold_norms(self) -> "BottomUpDetector":
        for m in self.modules():
            if isinstance(m, ConvNorm):
                m.unfold()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.unfold_norms()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_sizes: Sequence[Tuple[int, int]],
                scales: Sequence[float], *, autocast_dtype: Optional[torch.dtype] = None,
                roi_chunk: int = 256, timings: Optional[Dict[str, float]] = None,
                top_boxes: Optional[int] = None) -> List[DetectorOutput]:
        """``images`` [B, 3, H, W] (zero-padded), ``image_sizes`` each image's resized (h, w),
        ``scales`` each image's resize factor (boxes are divided by it).  ``autocast_dtype``:
        run the convolutions in bf16/fp16 (box arithmetic, softmax and NMS stay float32).
        ``timings``: seconds per stage are added to it (``backbone``, ``rpn``, ``res5_head``,
        ``selection``; the device is synchronised at each boundary).  ``top_boxes``: only
        that many boxes per image will be kept (UNITER's ``max_bb``): the confidences of the
        others may come out lower (see :func:`~.boxes.class_nms_max_conf`), which is faster."""
        b = images.shape[0]
        if len(image_sizes) != b or len(scales) != b:
            raise ValueError(f"detector: {b} images but {len(image_sizes)} sizes and "
                             f"{len(scales)} scales")
        if b == 0:
            return []
        cfg = self.cfg
        valid = _Valid([(int(h), int(w)) for h, w in image_sizes], images.shape[2],
                       images.shape[3])
        dev = images.device
        clock = _StageClock(timings, dev)
        ctx = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
               else _null())
        with ctx:
            feats, valid4 = self.backbone(images, valid)
            clock.lap("backbone")
            proposals = self.proposal_generator(feats, valid4.sizes, valid.sizes)
            clock.lap("rpn")
            rois = torch.cat([torch.cat([torch.full((p.shape[0], 1), float(i), device=dev),
                                         p], 1) for i, p in enumerate(proposals)])
            region = self.roi_heads.pooled_features(feats, rois, roi_chunk)
            clock.lap("res5_head")
        logits, attr_logits = self.roi_heads.box_predictor(region)
        probs = torch.softmax(logits.float(), dim=-1)
        attr_probs = (torch.softmax(attr_logits.float()[:, :-1], dim=-1)
                      if attr_logits is not None else None)
        out, start = [], 0
        for i, p in enumerate(proposals):
            r = slice(start, start + p.shape[0])
            start += p.shape[0]
            conf, obj = class_nms_max_conf(p, probs[r, :-1], cfg.class_nms, top=top_boxes)
            out.append(DetectorOutput(
                boxes=p / float(scales[i]), features=region[r], cls_probs=probs[r],
                attr_probs=attr_probs[r] if attr_probs is not None else None,
                conf=conf, obj_ids=obj))
        clock.lap("selection")
        return out


class _StageClock:
    def __init__(self, timings: Optional[Dict[str, float]], device: torch.device):
        self.timings, self.device = timings, device
        self.t = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        now = self._now()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
