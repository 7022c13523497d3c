"""Pictures of an answer, with PIL: what the detector found, what the model answered, and
what it aligned.

:func:`render` lays out, top to bottom:

1. the image(s) with the detected regions (the ``max_boxes`` most confident, outlined in
   the colours of :data:`PALETTE`, labelled ``<region> <attribute> <class>`` with Visual
   Genome's names from ``--labels``, ids otherwise) and the task's highlighted regions on
   top (the chosen one in :data:`CHOSEN`, runners-up in :data:`RUNNER_UP`, labelled with
   their scores); beside them the request's text and the ranked answers (texts, labels)
   with their scores, as bars when the scores are probabilities;
2. with an alignment: the image(s) again with each word's strongest region (the largest
   mass of UNITER's WRA transport plan) outlined in the word's colour and labelled with
   the word, and beside them the word x region heat map of the plan (rows: the words;
   columns: the regions, in the order of :attr:`~uniter_fast.predict.Alignment.regions`;
   cell colour :func:`colormap` of ``plan / vmax``, ``vmax`` the largest cell) with its
   colour bar.

Everything is placed by rule (nothing depends on fonts except text extents), and
:class:`Layout` records where: each image panel's origin and scale, each outlined box's
rectangle, colour and line width, the heat map's origin, cell size and ``vmax`` -- what a
test needs to check a picture by its pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..detector.image import load_image

__all__ = ["render", "Layout", "Panel", "DrawnBox", "HeatMap", "colormap", "colormap_index",
           "PALETTE", "WORD_PALETTE", "CHOSEN", "RUNNER_UP", "LUT"]

Colour = Tuple[int, int, int]

#: the detected regions' outlines (region r: PALETTE[r % len])
PALETTE: Tuple[Colour, ...] = ((31, 119, 180), (44, 160, 44), (23, 190, 207), (148, 103, 189),
                               (140, 86, 75), (188, 189, 34), (127, 127, 127), (0, 128, 128),
                               (65, 105, 225), (46, 139, 87))
#: the words' colours in the alignment (word w: WORD_PALETTE[w % len])
WORD_PALETTE: Tuple[Colour, ...] = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                                    (145, 30, 180), (70, 240, 240), (240, 50, 230),
                                    (210, 245, 60), (0, 128, 128), (170, 110, 40))
#: the chosen region (RE's box), and the runners-up; no other element is drawn in these
CHOSEN: Colour = (255, 0, 255)
RUNNER_UP: Colour = (255, 165, 0)
#: score bars of the ranked answers
BAR: Colour = (70, 130, 180)
BACKGROUND: Colour = (255, 255, 255)
TEXT: Colour = (20, 20, 20)

MARGIN, GAP, LINE = 12, 14, 3
TEXT_WIDTH = 380
HEADER = 20
ROW_H = 18


def _viridis_lut() -> np.ndarray:
    """256 RGB entries along viridis (five anchors, linear between them)."""
    anchors = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                        (253, 231, 37)], dtype=np.float64)
    t = np.linspace(0.0, 1.0, 256) * (len(anchors) - 1)
    i = np.minimum(t.astype(int), len(anchors) - 2)
    f = (t - i)[:, None]
    return np.rint(anchors[i] * (1 - f) + anchors[i + 1] * f).astype(np.uint8)


#: the heat map's colour of value v in [0, 1]: LUT[round(255 v)]
LUT = _viridis_lut()


def colormap(v: np.ndarray) -> np.ndarray:
    """RGB uint8 of values in [0, 1] (clipped)."""
    idx = np.rint(np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) * 255).astype(int)
    return LUT[idx]


def colormap_index(rgb: Sequence[int]) -> int:
    """The LUT entry nearest to a colour (the value is ``index / 255``)."""
    d = ((LUT.astype(int) - np.asarray(rgb, dtype=int)[None, :]) ** 2).sum(axis=1)
    return int(d.argmin())


@dataclass
class Panel:
    """An image drawn at ``(x, y)``, ``scale`` x its size (``w`` x ``h`` pixels);
    ``kind``: ``"regions"`` (row 1) or ``"alignment"`` (row 2)."""
    image: int
    kind: str
    x: int
    y: int
    w: int
    h: int
    scale: float

    def to_canvas(self, box: Sequence[float]) -> Tuple[int, int, int, int]:
        """A box (x1, y1, x2, y2 in image pixels) in the picture's pixels, inside the panel."""
        x1, y1, x2, y2 = (float(v) for v in box[:4])

        def cx(v):
            return int(min(max(round(self.x + v * self.scale), self.x), self.x + self.w - 1))

        def cy(v):
            return int(min(max(round(self.y + v * self.scale), self.y), self.y + self.h - 1))
        return cx(x1), cy(y1), cx(x2), cy(y2)


@dataclass
class DrawnBox:
    """An outlined region: its panel (index into :attr:`Layout.panels`), region, rectangle
    (x1, y1, x2, y2, inclusive, in the picture), colour, line width and label."""
    panel: int
    region: int
    rect: Tuple[int, int, int, int]
    colour: Colour
    width: int
    label: str
    #: the label's filled rectangle (inclusive; None: no label)
    label_rect: Optional[Tuple[int, int, int, int]] = None


@dataclass
class HeatMap:
    """The word x region heat map: cell (r, c) fills ``[x + c cell_w, y + r cell_h]`` to
    ``[x + (c+1) cell_w - 1, y + (r+1) cell_h - 1]`` with ``colormap(plan[r, c] / vmax)``."""
    x: int
    y: int
    cell_w: int
    cell_h: int
    rows: int
    cols: int
    vmax: float

    def cell(self, r: int, c: int) -> Tuple[int, int, int, int]:
        x0, y0 = self.x + c * self.cell_w, self.y + r * self.cell_h
        return x0, y0, x0 + self.cell_w - 1, y0 + self.cell_h - 1


@dataclass
class Layout:
    size: Tuple[int, int]
    panels: List[Panel] = field(default_factory=list)
    boxes: List[DrawnBox] = field(default_factory=list)
    heatmap: Optional[HeatMap] = None
    text_origin: Tuple[int, int] = (0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):      # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> Tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text or " ")
    return int(x1 - min(x0, 0)), int(y1 - min(y0, 0))


def _ink(bg: Colour) -> Colour:
    return (0, 0, 0) if 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] > 140 else (255, 255, 255)


def _wrap(font, text: str, width: int) -> List[str]:
    lines, cur = [], ""
    for w in text.split():
        t = f"{cur} {w}" if cur else w
        if cur and _text_size(font, t)[0] > width:
            lines.append(cur)
            cur = w
        else:
            cur = t
    if cur:
        lines.append(cur)
    return lines or [""]


def _fit(font, text: str, width: int) -> str:
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "…")[0] > width:
        text = text[:-1]
    return text + "…"


class _Canvas:
    def __init__(self, size):
        self.image = Image.new("RGB", size, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small = _font(13), _font(11)

    def box(self, layout: Layout, panel_i: int, region: int, box, colour: Colour, width: int,
            label: str) -> DrawnBox:
        p = layout.panels[panel_i]
        rect = p.to_canvas(box)
        x1, y1, x2, y2 = rect
        self.draw.rectangle(rect, outline=colour, width=width)
        label_rect = None
        if label:
            tw, th = _text_size(self.small, label)
            tw = min(tw + 4, p.w)
            ly = y1 - th - 2 if y1 - th - 2 >= p.y else y1
            lx = min(x1, p.x + p.w - tw)
            label_rect = (lx, ly, lx + tw - 1, ly + th + 1)
            self.draw.rectangle(label_rect, fill=colour)
            self.draw.text((lx + 2, ly), _fit(self.small, label, tw - 4), fill=_ink(colour),
                           font=self.small)
        d = DrawnBox(panel_i, int(region), rect, colour, width, label, label_rect)
        layout.boxes.append(d)
        return d


def _place_panels(layout: Layout, sizes, image_size: int, y: int, kind: str) -> int:
    """Panels of the images side by side from (MARGIN, y); returns their right end."""
    x = MARGIN
    for i, (h, w) in enumerate(sizes):
        s = image_size / max(h, w)
        pw, ph = max(1, int(round(w * s))), max(1, int(round(h * s)))
        layout.panels.append(Panel(i, kind, x, y, pw, ph, s))
        x += pw + GAP
    return x - GAP


def render(request: Dict[str, Any], picture: Dict[str, Any], alignment=None, labels=None,
           image_size: int = 480, max_boxes: int = 10) -> Tuple[Image.Image, Layout]:
    """The picture of one answered request (see the module docstring): ``request`` with its
    ``image_paths`` and ``images`` (:class:`~uniter_fast.predict.ImageFeatures`),
    ``picture`` the task's ``predict_picture``, ``alignment`` an
    :class:`~uniter_fast.predict.Alignment` or None, ``labels`` a
    :class:`~uniter_fast.predict.Labels`.  Each image is drawn with its longer side
    ``image_size`` pixels."""
    from . import Labels
    labels = labels or Labels()
    feats = request["images"]
    rgbs = [load_image(p) for p in request["image_paths"]]
    for f, a in zip(feats, rgbs):
        if a.shape[:2] != (f.height, f.width):
            raise ValueError(f"image {f.path} is {a.shape[1]}x{a.shape[0]} now, "
                             f"{f.width}x{f.height} when its regions were detected")
    sizes = [a.shape[:2] for a in rgbs]
    font_probe = _font(13)
    layout = Layout(size=(0, 0))

    # ---- row 1: regions | text
    y1 = MARGIN + HEADER
    right = _place_panels(layout, sizes, image_size, y1, "regions")
    tx = right + GAP
    text_lines: List[Tuple[str, Any]] = []
    for t in picture.get("title", []):
        text_lines.extend(("title", s) for s in _wrap(font_probe, t, TEXT_WIDTH))
    ranked = list(picture.get("ranked", []))
    bars = bool(ranked) and all(0.0 <= float(s) <= 1.0 for _, s in ranked)
    text_h = ROW_H * len(text_lines) + (ROW_H + (6 if bars else 0)) * len(ranked) + ROW_H
    row1_h = max(max(p.h for p in layout.panels), text_h)
    n1 = len(layout.panels)

    # ---- row 2: alignment panels | heat map
    hm = None
    if alignment is not None:
        y2 = y1 + row1_h + GAP + HEADER
        right2 = _place_panels(layout, sizes, image_size, y2, "alignment")
        rows, cols = alignment.plan.shape
        cell_w = max(4, min(22, 720 // max(cols, 1)))
        cell_h = 16
        label_w = max(_text_size(font_probe, w)[0] for w in alignment.words) + 8
        vmax = float(alignment.plan.max()) if alignment.plan.size else 1.0
        hm = HeatMap(right2 + GAP + label_w, y2 + ROW_H, cell_w, cell_h, rows, cols,
                     vmax if vmax > 0 else 1.0)
        hm_right = hm.x + cols * cell_w + 70
        row2_h = max(max(p.h for p in layout.panels[n1:]), ROW_H + rows * cell_h + ROW_H)
        width = max(tx + TEXT_WIDTH, hm_right) + MARGIN
        height = y2 + row2_h + MARGIN
    else:
        width = tx + TEXT_WIDTH + MARGIN
        height = y1 + row1_h + MARGIN
    layout.size = (int(width), int(height))
    layout.heatmap = hm
    layout.text_origin = (tx, y1)
    cv = _Canvas(layout.size)
    d = cv.draw

    # ---- row 1
    d.text((MARGIN, MARGIN), "detected regions" + (" (highlighted: the answer)"
                                                   if picture.get("highlight") else ""),
           fill=TEXT, font=cv.font)
    highlight = list(picture.get("highlight", []))
    hl_keys = {(int(i), int(r)) for i, r, _ in highlight}
    for pi in range(n1):
        p = layout.panels[pi]
        f = feats[p.image]
        cv.image.paste(Image.fromarray(rgbs[p.image]).resize((p.w, p.h), Image.BILINEAR),
                       (p.x, p.y))
        for r in range(min(max_boxes, f.num_boxes)):
            if (p.image, r) in hl_keys:
                continue
            attr = None if f.attr_ids is None else f.attr_ids[r]
            cv.box(layout, pi, r, f.boxes[r], PALETTE[r % len(PALETTE)], LINE,
                   f"{r} {labels.region(f.obj_ids[r], attr)}")
    for k, (img, r, label) in reversed(list(enumerate(highlight))):
        pi = next(i for i in range(n1) if layout.panels[i].image == int(img))
        cv.box(layout, pi, int(r), feats[int(img)].boxes[int(r)],
               CHOSEN if k == 0 else RUNNER_UP, LINE + 2 if k == 0 else LINE, label)
    y = y1
    for kind, s in text_lines:
        d.text((tx, y), s, fill=TEXT, font=cv.font)
        y += ROW_H
    y += ROW_H // 2
    for i, (label, score) in enumerate(ranked):
        s = f"{float(score):.3f}"
        sw = _text_size(cv.font, s)[0]
        d.text((tx, y), _fit(cv.font, f"{i + 1}. {label}", TEXT_WIDTH - sw - 10), fill=TEXT,
               font=cv.font)
        d.text((tx + TEXT_WIDTH - sw, y), s, fill=TEXT, font=cv.font)
        y += ROW_H
        if bars:
            bw = int(round(float(score) * TEXT_WIDTH))
            if bw > 0:
                d.rectangle([tx, y - 2, tx + bw - 1, y + 2], fill=BAR)
            y += 6

    # ---- row 2
    if alignment is not None:
        y2 = layout.panels[n1].y
        d.text((MARGIN, y2 - HEADER), "word -> strongest region (WRA transport plan)",
               fill=TEXT, font=cv.font)
        for pi in range(n1, len(layout.panels)):
            p = layout.panels[pi]
            cv.image.paste(Image.fromarray(rgbs[p.image]).resize((p.w, p.h), Image.BILINEAR),
                           (p.x, p.y))
        best = alignment.strongest()
        by_region: Dict[int, List[int]] = {}
        for w, c in enumerate(best):
            by_region.setdefault(c, []).append(w)
        for c, ws in by_region.items():
            img, r = alignment.regions[c]
            pi = next(i for i in range(n1, len(layout.panels))
                      if layout.panels[i].image == img)
            cv.box(layout, pi, r, feats[img].boxes[r], WORD_PALETTE[ws[0] % len(WORD_PALETTE)],
                   LINE, ", ".join(alignment.words[w] for w in ws))
        # the heat map
        cells = colormap(alignment.plan / hm.vmax)
        for r in range(hm.rows):
            x0, y0, _, _ = hm.cell(r, 0)
            word = alignment.words[r]
            ww, wh = _text_size(cv.font, word)
            d.text((hm.x - 6 - ww, y0 + (hm.cell_h - wh) // 2), word,
                   fill=WORD_PALETTE[r % len(WORD_PALETTE)], font=cv.font)
            for c in range(hm.cols):
                d.rectangle(hm.cell(r, c), fill=tuple(int(v) for v in cells[r, c]))
        step = max(1, int(np.ceil(24 / hm.cell_w)))
        for c in range(0, hm.cols, step):
            img, r = alignment.regions[c]
            tag = f"{r}" if len(feats) == 1 else f"{img}:{r}"
            d.text((hm.x + c * hm.cell_w, hm.y - ROW_H + 2), tag, fill=TEXT, font=cv.small)
        # colour bar: 0 at the bottom, vmax at the top
        bx, by, bh = hm.x + hm.cols * hm.cell_w + 10, hm.y, max(hm.rows * hm.cell_h, 32)
        for k in range(bh):
            d.line([(bx, by + k), (bx + 9, by + k)],
                   fill=tuple(int(v) for v in colormap(1.0 - k / max(bh - 1, 1))))
        d.text((bx + 13, by - 2), f"{hm.vmax:.3g}", fill=TEXT, font=cv.small)
        d.text((bx + 13, by + bh - 12), "0", fill=TEXT, font=cv.small)
    return cv.image, layout
