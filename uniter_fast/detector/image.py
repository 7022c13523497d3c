"""Image files to the detector's input, with PIL and torch only (no torchvision, no OpenCV).

As the caffe extraction (``cv2.imread`` then ``_get_image_blob``): 8-bit BGR, EXIF orientation
applied (OpenCV's ``imread`` does so), the pixel mean subtracted, then one scale factor for both
axes (shorter side to ``min_size`` unless the longer would pass ``max_size``) with bilinear
interpolation.  Grayscale, palette, RGBA/LA (alpha dropped, as ``imread`` does), CMYK and
16-bit images are converted; a file that is not an image, is truncated or cannot be decoded
raises :class:`ImageError` naming the file and the reason.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import DetectorConfig

__all__ = ["ImageError", "PreparedImage", "load_image", "resized_size", "prepare",
           "pad_batch", "IMAGE_EXTENSIONS"]

#: file name endings taken as images when a folder is given (case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".jpe")

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that cannot be read as an image (the message names it and why)."""


def _name(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return f"<{type(src).__name__}>"


def _to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        # 16-bit samples to 8 bit as OpenCV's imread(IMREAD_COLOR) does (the high byte)
        a = np.clip(a >> 8 if a.max(initial=0) > 255 else a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA" if mode != "LA" else "LA")
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def load_image(src: ImageSource) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from a file path, encoded bytes, a PIL image or an array
    ([H, W] gray or [H, W, 3] RGB, uint8).  Raises :class:`ImageError`."""
    name = _name(src)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 [H, W, 3] (RGB) or [H, W], got "
                             f"{a.dtype} {list(src.shape)}")
        rgb = np.ascontiguousarray(a)
    else:
        try:
            if isinstance(src, Image.Image):
                img = src
                img.load()
            else:
                fh = io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")
                with fh:
                    with Image.open(fh) as opened:
                        opened.load()          # decode now: truncated data raises here
                        img = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
            rgb = _to_rgb(img)
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a directory, not an image") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name}: not an image PIL can read") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: too many pixels ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: cannot be decoded ({type(e).__name__}: {e})") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"{name}: empty image ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def resized_size(height: int, width: int, cfg: DetectorConfig) -> Tuple[int, int, float]:
    """The caffe test scale: shorter side to ``min_size`` unless the longer side would pass
    ``max_size`` (then the longer side to ``max_size``); returns (new h, new w, scale)."""
    short, long = min(height, width), max(height, width)
    scale = cfg.min_size / short
    if round(scale * long) > cfg.max_size:
        scale = cfg.max_size / long
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


@dataclass
class PreparedImage:
    """The detector's input for one image: ``pixels`` [3, h, w] float32 (BGR minus the pixel
    mean, resized), ``scale`` (resized / original), ``height``/``width`` of the original."""
    pixels: torch.Tensor
    scale: float
    height: int
    width: int

    @property
    def size(self) -> Tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def prepare(rgb: np.ndarray, cfg: DetectorConfig) -> PreparedImage:
    """Mean-subtracted BGR, resized by the caffe rule (bilinear, half-pixel centres, no
    anti-aliasing: OpenCV's ``INTER_LINEAR``)."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    nh, nw, scale = resized_size(h, w, cfg)
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1).float()
    x = x - torch.tensor(cfg.pixel_mean, dtype=torch.float32)[:, None, None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=False)[0]
    return PreparedImage(x.contiguous(), float(scale), h, w)


def pad_batch(images: Sequence[PreparedImage]
              ) -> Tuple[torch.Tensor, List[Tuple[int, int]], List[float]]:
    """Zero-pad prepared images to one [B, 3, H, W] tensor; returns it, each image's resized
    (h, w) and scale."""
    if not images:
        return torch.zeros(0, 3, 1, 1), [], []
    hh = max(p.size[0] for p in images)
    ww = max(p.size[1] for p in images)
    out = torch.zeros(len(images), 3, hh, ww, dtype=torch.float32)
    for i, p in enumerate(images):
        out[i, :, :p.size[0], :p.size[1]] = p.pixels
    return out, [p.size for p in images], [p.scale for p in images]
