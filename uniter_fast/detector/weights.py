"""Load the public Visual Genome detector weights, strictly and without running their code.

Two published layouts, both with detectron2's parameter names and background LAST in the
class head:

* ``faster_rcnn_from_caffe_attr.pkl`` (py-bottom-up-attention): a pickle of
  ``{"model": {name: numpy array}, ...}``.  Read with :class:`ArrayUnpickler`, which admits
  numpy arrays and dtypes and plain containers only (any other class in the file is refused
  before it is built), never ``pickle.load``.  Its frozen norms may come without
  ``running_mean``/``running_var`` (then 0 and 1, as detectron2 fills them).
* ``pytorch_model.bin`` of the Hugging Face LXMERT demo (``unc-nlp/frcnn-vg-finetuned``): a
  torch file read with ``weights_only=True``.  It also stores the RPN's cell anchors
  (``proposal_generator.anchor_generator.cell_anchors.0``, used as they are) and may store
  BatchNorm's ``num_batches_tracked`` (meaningless for a frozen norm: read and dropped).

Loading is strict: every tensor of the file is used and every parameter of the model comes
from the file; a missing, unexpected or misshapen key is an error that names it.  The
network's shape (depth, widths, classes, attributes, anchors per cell) is read off the file.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .config import DetectorConfig
from .model import BottomUpDetector

__all__ = ["WeightsError", "ArrayUnpickler", "read_weights", "config_from_state_dict",
           "load_detector", "find_weights_file", "ANCHORS_KEY"]

ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
_MODEL_ANCHORS = "proposal_generator.anchor_generator.cell_anchors"
#: extra keys a layout may hold that carry no weight (dropped after a check)
_BN_COUNT = "num_batches_tracked"
_PIXEL_KEYS = ("pixel_mean", "pixel_std")


class WeightsError(ValueError):
    """A weights file that cannot be used (the message names the file and the key)."""


# --------------------------------------------------------------------------- the pickle


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into a protocol-2 pickle (str, latin-1)
    and nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, "
                                     f"{encoding!r}): only latin-1 text to bytes is admitted")
    return text.encode("latin1")


#: (module, name) -> the object a pickle may name: numpy arrays, dtypes and scalars, and
#: OrderedDict; numpy 1 and numpy 2 module paths both
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("_codecs", "encode"): lambda: _latin1_bytes,
}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes, numpy scalars and plain containers
    (dict, list, tuple, str, bytes, numbers) only.  Any other global the pickle names is
    refused before it is imported or called (:class:`pickle.UnpicklingError` naming it)."""

    def find_class(self, module: str, name: str) -> Any:
        get = _ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a weights pickle may hold numpy arrays and "
                "plain containers only")
        return get()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: a weights pickle may hold "
                                     "numpy arrays and plain containers only")


def _read_pickle(path: str) -> Dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: {e}") from None
    except Exception as e:
        raise WeightsError(f"{path}: not a readable weights pickle ({type(e).__name__}: "
                           f"{e})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict with a 'model' entry (detectron2's pkl), "
                           f"got {type(obj).__name__}")
    model = obj.get("model", obj if all(isinstance(v, np.ndarray) for v in obj.values())
                    else None)
    if not isinstance(model, dict):
        raise WeightsError(f"{path}: no 'model' dict of arrays in the pickle (keys: "
                           f"{sorted(map(str, obj))[:10]})")
    out = {}
    for k, v in model.items():
        if not isinstance(k, str):
            raise WeightsError(f"{path}: parameter name {k!r} is not a string")
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" or v.dtype.fields:
            got = v.dtype if isinstance(v, np.ndarray) else type(v).__name__
            raise WeightsError(f"{path}: {k} is {got}, expected a numeric array")
        out[k] = torch.from_numpy(np.array(v, copy=True))
    return out


def _read_torch(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused: it holds more than tensors and plain containers "
                           f"({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: {k} is {type(v).__name__}, expected a tensor")
        out[str(k)] = v
    return out


def find_weights_file(path: str) -> str:
    """``path`` itself, or the one weights file in a directory (``pytorch_model.bin`` or a
    ``*.pkl``/``*.pth``/``*.pt``)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if n == "pytorch_model.bin" or n.endswith((".pkl", ".pth", ".pt")))
        if len(names) != 1:
            raise WeightsError(f"detector weights {path}: a directory must hold exactly one of "
                               f"pytorch_model.bin / *.pkl / *.pth / *.pt, found {names}")
        return os.path.join(path, names[0])
    if not os.path.exists(path):
        raise WeightsError(f"detector weights {path}: no such file")
    return path


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a weights file and its layout (``"detectron2-pkl"`` or ``"torch"``),
    by content: a zip archive is a torch file, a pickle whose top level is a dict of numpy
    arrays is detectron2's."""
    path = find_weights_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or path.endswith((".bin", ".pth", ".pt")):
        return _read_torch(path), "torch"
    return _read_pickle(path), "detectron2-pkl"


# --------------------------------------------------------------------------- the network shape


def _count(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.conv1\.weight$")
    idx = [int(m.group(1)) for k in sd for m in [pat.match(k)] if m]
    return max(idx) + 1 if idx else 0


def _shape(sd: Dict[str, torch.Tensor], key: str, where: str) -> Tuple[int, ...]:
    if key not in sd:
        raise WeightsError(f"{where}: missing {key}")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Dict[str, torch.Tensor], base: Optional[DetectorConfig] = None,
                           where: str = "detector weights") -> DetectorConfig:
    """The network shape a state dict describes, on top of ``base``'s settings (the res5
    dilation, pooling size and test-time settings cannot be read off the weights)."""
    base = base or DetectorConfig()
    blocks = tuple(_count(sd, f"backbone.res{i}") for i in (2, 3, 4))
    if min(blocks) == 0:
        raise WeightsError(f"{where}: no backbone.res2/res3/res4 blocks (found {blocks}); not "
                           "a bottom-up-attention C4 detector's weights")
    res5 = _count(sd, "roi_heads.res5")
    if res5 == 0:
        raise WeightsError(f"{where}: no roi_heads.res5 blocks; not a C4 detector's weights")
    cls = _shape(sd, "roi_heads.box_predictor.cls_score.weight", where)
    attrs = (_shape(sd, "roi_heads.box_predictor.attr_score.weight", where)[0] - 1
             if "roi_heads.box_predictor.attr_score.weight" in sd else 0)
    n_anchor = _shape(sd, "proposal_generator.rpn_head.objectness_logits.weight", where)[0]
    changes = dict(
        blocks=blocks, res5_blocks=res5,
        stem_channels=_shape(sd, "backbone.stem.conv1.weight", where)[0],
        res2_channels=_shape(sd, "backbone.res2.0.conv3.weight", where)[0],
        bottleneck_channels=_shape(sd, "backbone.res2.0.conv1.weight", where)[0],
        rpn_channels=_shape(sd, "proposal_generator.rpn_head.conv.weight", where)[0],
        num_classes=cls[0] - 1, num_attrs=attrs)
    if n_anchor != base.num_anchors:
        raise WeightsError(
            f"{where}: the RPN predicts {n_anchor} anchors per cell but the anchor sizes "
            f"{base.anchor_sizes} x ratios {base.anchor_ratios} give {base.num_anchors}")
    if "pixel_mean" in sd:
        mean = sd["pixel_mean"].reshape(-1).tolist()
        if len(mean) != 3:
            raise WeightsError(f"{where}: pixel_mean must have 3 values, got {len(mean)}")
        changes["pixel_mean"] = tuple(float(m) for m in mean)
    return base.replace(**changes)


# --------------------------------------------------------------------------- strict loading


def _prepare_state_dict(sd: Dict[str, torch.Tensor], model: BottomUpDetector,
                        where: str) -> Dict[str, torch.Tensor]:
    expected = model.state_dict()
    sd = dict(sd)
    if ANCHORS_KEY in sd:
        sd[_MODEL_ANCHORS] = sd.pop(ANCHORS_KEY)
    else:
        sd[_MODEL_ANCHORS] = expected[_MODEL_ANCHORS]      # generated from the config
    if "pixel_std" in sd:
        std = sd.pop("pixel_std").reshape(-1)
        if not torch.allclose(std.float(), torch.ones_like(std, dtype=torch.float32)):
            raise WeightsError(f"{where}: pixel_std {std.tolist()} is not 1: the caffe model "
                               "takes raw 0..255 pixels minus the mean")
    sd.pop("pixel_mean", None)                               # read into the config
    for k in [k for k in sd if k.endswith("." + _BN_COUNT)]:
        if k[:-len(_BN_COUNT)] + "running_mean" not in expected:
            raise WeightsError(f"{where}: unexpected key {k} (not a norm of this model)")
        del sd[k]
    # frozen norms stored as weight and bias only: running stats 0 and 1 (detectron2)
    for k in expected:
        if k.endswith(".norm.running_mean") and k not in sd:
            base = k[:-len("running_mean")]
            if base + "weight" in sd and base + "running_var" not in sd:
                sd[k] = torch.zeros_like(expected[k])
                sd[base + "running_var"] = torch.ones_like(expected[base + "running_var"])
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise WeightsError(f"{where}: does not match the bottom-up-attention detector: "
                           + "; ".join(parts))
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"{where}: {k} has shape {list(sd[k].shape)}, the model expects "
                               f"{list(v.shape)}")
        if not sd[k].dtype.is_floating_point:
            raise WeightsError(f"{where}: {k} has dtype {sd[k].dtype}, expected floating point")
        if not torch.isfinite(sd[k]).all():
            raise WeightsError(f"{where}: {k} contains NaN or inf")
        sd[k] = sd[k].to(v.dtype)
    return sd


def load_detector(path: str, config: Optional[DetectorConfig] = None) -> BottomUpDetector:
    """The detector with the weights at ``path`` (a file or a directory holding one), in
    eval mode on the CPU, float32.  ``config`` gives the settings the weights do not fix
    (preset sizes, thresholds, res5 dilation); the network's shape comes from the file."""
    sd, layout = read_weights(path)
    where = f"detector weights {find_weights_file(path)} ({layout})"
    cfg = config_from_state_dict(sd, config, where)
    if ANCHORS_KEY in sd:
        anchors = sd[ANCHORS_KEY]
        n_anchor = sd["proposal_generator.rpn_head.objectness_logits.weight"].shape[0]
        if anchors.dim() != 2 or anchors.shape != (n_anchor, 4):
            raise WeightsError(f"{where}: {ANCHORS_KEY} has shape {list(anchors.shape)}, "
                               f"expected [{n_anchor}, 4] (one per RPN output)")
    model = BottomUpDetector(cfg)
    if ANCHORS_KEY in sd:
        model.proposal_generator.anchor_generator.cell_anchors = \
            torch.zeros_like(sd[ANCHORS_KEY], dtype=torch.float32)
    model.load_state_dict(_prepare_state_dict(sd, model, where), strict=True)
    model.weights_layout = layout
    return model.eval()
