"""From image files and text to a fine-tuned UNITER's answer, in one process: the detector
(:mod:`uniter_fast.detector`) makes each image's region features, the task model (a
fine-tuning run or an exported ``.pt``, loaded as ``python -m uniter_fast.infer`` loads it)
answers.  ``python -m uniter_fast.predict`` is the command line
(:mod:`uniter_fast.predict.__main__`); :class:`Predictor` the same as a library:

>>> p = Predictor("vqa", "output/finetune-vqa", "faster_rcnn_from_caffe_attr.pkl",
...               vocab="vocab.txt")
>>> [r] = p.answer([{"image": "kitchen.jpg", "question": "what is on the table?"}])
>>> r.answer["answer"], r.answer["score"], r.answer["top"][:3]
>>> p.draw(r, "kitchen_vqa.png")          # boxes, the answers, the word-region alignment

What is shared lives here and knows no task: requests (their fields are the task's
:attr:`~uniter_fast.tasks.base.FinetuneTask.predict_fields`), the image features (the
extractor with the run's box rule, rounded through float16 as the image db stores them, so
that ``predict`` answers exactly as ``infer`` does on a db of the same images), their cache
(by content: sha256 of the file's bytes and the detector's settings; in memory, and on disk
with ``cache_dir``), the tokenizer (prepro's :class:`~uniter_fast.prepro.BertTokenizer`, word
by word as the text dbs), :class:`PredictContext` (what a task's ``predict_requests`` uses),
the word-region alignment (:func:`word_region_alignment`: UNITER's WRA transport plan) and
the pictures (:mod:`uniter_fast.predict.draw`).  Each task's own part (its fields, how a
request becomes its batch, how outputs become an answer, what its picture shows) is a
method of its task class (``predict_requests``, ``predict_alignment``, ``predict_picture``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import checkpoint as ckpt_lib
from .. import ops
from ..constants import DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB, DEFAULT_NUM_BB
from ..data.datasets import img_pos_feat
from ..data.loader import move_to_device
from ..detector.extractor import aspect_batches
from ..detector.image import ImageError
from ..detector.weights import WeightsError, find_weights_file
from ..extract import ExtractError, check_box_rule, detector_config, make_extractor
from ..model.compile import compile_counts, compiling, use_compile
from ..prepro import BertTokenizer, PreproError
from ..tasks import TASKS, FinetuneTask, get_task
from ..tasks.inference import amp_dtype, inference_config, resolve_checkpoint

__all__ = ["PredictError", "ImageFeatures", "FeatureCache", "PredictContext", "Alignment",
           "Result", "Predictor", "word_region_alignment", "read_requests", "load_labels",
           "Labels", "DEFAULT_TOP_K", "DEFAULT_BATCH_SIZE"]

#: answers (or regions, texts) listed per request
DEFAULT_TOP_K = 5
#: requests per model batch
DEFAULT_BATCH_SIZE = 16
#: images kept in the in-memory feature cache
MEMORY_CACHE_IMAGES = 512
#: requests read, extracted and answered together from a requests file
CHUNK_REQUESTS = 256
#: bytes of the detector weights file hashed (from each end) to tell two files apart
_WEIGHTS_HASH_BYTES = 1 << 20


class PredictError(ValueError):
    """A request, an option or an input that cannot be used (the message says where: the
    option or the requests file and line, and what was expected)."""


# --------------------------------------------------------------------------- image features


@dataclass
class ImageFeatures:
    """The regions of one image as the model reads them: ``features`` [n, d] and
    ``norm_bb`` [n, 6] rounded through float16 (the image db's storage) back to float32;
    ``boxes`` [n, 4] (x1, y1, x2, y2 in the image's pixels), ``conf`` [n], ``obj_ids`` /
    ``attr_ids`` [n] (class and attribute ids; ``attr_ids`` None without an attribute
    head), ``height``/``width`` of the image, ``digest`` (sha256 of the file's bytes)."""
    path: str
    digest: str
    features: np.ndarray
    norm_bb: np.ndarray
    boxes: np.ndarray
    conf: np.ndarray
    obj_ids: np.ndarray
    attr_ids: Optional[np.ndarray]
    height: int
    width: int

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])

    def inputs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(img_feat [n, d], img_pos_feat [n, 7])`` as the datasets build them."""
        feat = torch.from_numpy(np.ascontiguousarray(self.features))
        return feat, img_pos_feat(torch.from_numpy(np.ascontiguousarray(self.norm_bb)))

    def boxes_xywh(self) -> np.ndarray:
        """Each region's box [x, y, w, h] in pixels from ``norm_bb`` and the image size, as
        the RE evaluation computes it (``ReEvalDataset``'s ``obj_boxes``)."""
        pos = self.inputs()[1].numpy()
        w, h = float(self.width), float(self.height)
        return np.stack([pos[:, 0] * w, pos[:, 1] * h, pos[:, 4] * w, pos[:, 5] * h], axis=1)

    @classmethod
    def from_record(cls, path: str, digest: str, rec: Dict[str, Any]) -> "ImageFeatures":
        """From an :class:`~uniter_fast.detector.Extractor` record (or a cached one)."""
        def f16(a):
            return np.asarray(a).astype(np.float16).astype(np.float32)
        attr = rec.get("attr_ids")
        return cls(path=path, digest=digest, features=f16(rec["features"]),
                   norm_bb=f16(rec["norm_bb"]), boxes=np.asarray(rec["boxes"], np.float32),
                   conf=np.asarray(rec["conf"], np.float32),
                   obj_ids=np.asarray(rec["obj_ids"]),
                   attr_ids=None if attr is None else np.asarray(attr),
                   height=int(np.asarray(rec["height"])), width=int(np.asarray(rec["width"])))

    def record(self) -> Dict[str, np.ndarray]:
        """The arrays the disk cache stores (features and boxes as float16, as the db)."""
        out = {"features": self.features.astype(np.float16),
               "norm_bb": self.norm_bb.astype(np.float16), "boxes": self.boxes,
               "conf": self.conf, "obj_ids": self.obj_ids,
               "height": np.asarray(self.height), "width": np.asarray(self.width)}
        if self.attr_ids is not None:
            out["attr_ids"] = self.attr_ids
        return out


class FeatureCache:
    """Image features by content: the key is sha256 of the detector's settings and the
    image file's sha256, so the same bytes under another name hit, and another detector,
    box rule, image size or precision does not.  In memory (the last
    :data:`MEMORY_CACHE_IMAGES` images) and, with ``cache_dir``, on disk
    (``cache_dir/<2 hex>/<key>.npz``, written atomically; an unreadable file is ignored and
    replaced)."""

    def __init__(self, settings: Dict[str, Any], cache_dir: Optional[str] = None,
                 max_items: int = MEMORY_CACHE_IMAGES):
        self.settings = dict(settings)
        self._salt = json.dumps(self.settings, sort_keys=True).encode("utf-8")
        self.cache_dir = cache_dir
        self.max_items = int(max_items)
        self._mem: "OrderedDict[str, Dict[str, np.ndarray]]" = OrderedDict()
        self.hits = {"memory": 0, "disk": 0}
        if cache_dir is not None:
            try:
                os.makedirs(cache_dir, exist_ok=True)
            except OSError as e:
                raise PredictError(f"--cache_dir {cache_dir}: cannot be created "
                                   f"({e.strerror or e})") from None

    def key(self, digest: str) -> str:
        return hashlib.sha256(self._salt + b"\0" + digest.encode("ascii")).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.cache_dir, key[:2], key + ".npz")

    def get(self, key: str) -> Optional[Dict[str, np.ndarray]]:
        rec = self._mem.get(key)
        if rec is not None:
            self._mem.move_to_end(key)
            self.hits["memory"] += 1
            return rec
        if self.cache_dir is None:
            return None
        try:
            with np.load(self._path(key), allow_pickle=False) as z:
                rec = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):
            return None          # absent, or a broken file: extracted again and rewritten
        if not {"features", "norm_bb", "boxes", "conf", "obj_ids", "height",
                "width"} <= set(rec):
            return None
        self.hits["disk"] += 1
        self._remember(key, rec)
        return rec

    def put(self, key: str, rec: Dict[str, np.ndarray]) -> None:
        self._remember(key, rec)
        if self.cache_dir is None:
            return
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with io.BytesIO() as buf:
            np.savez(buf, **rec)
            data = buf.getvalue()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _remember(self, key: str, rec: Dict[str, np.ndarray]) -> None:
        self._mem[key] = rec
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)


def _weights_identity(path: str) -> Dict[str, Any]:
    """The detector weights file's name, size and a hash of its first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_WEIGHTS_HASH_BYTES))
        if size > _WEIGHTS_HASH_BYTES:
            f.seek(max(_WEIGHTS_HASH_BYTES, size - _WEIGHTS_HASH_BYTES))
            h.update(f.read())
    return {"weights_file": os.path.basename(path), "weights_size": size,
            "weights_sha256_ends": h.hexdigest()}


# --------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Visual Genome's class and attribute names (``objects_vocab.txt``,
    ``attributes_vocab.txt``: one per line, synonyms after commas); ids otherwise."""
    objects: Optional[List[str]] = None
    attributes: Optional[List[str]] = None

    def region(self, obj: int, attr: Optional[int]) -> str:
        def name(names, i, what):
            if names is not None and 0 <= i < len(names):
                return names[i]
            return f"{what}{i}"
        obj_name = name(self.objects, int(obj), "obj ")
        if attr is None:
            return obj_name
        return f"{name(self.attributes, int(attr), 'attr ')} {obj_name}"


def load_labels(path: Optional[str]) -> Labels:
    """The names in ``path`` (a folder with ``objects_vocab.txt`` and/or
    ``attributes_vocab.txt``); None: ids."""
    if path is None:
        return Labels()
    if not os.path.isdir(path):
        raise PredictError(f"--labels {path}: not a folder (expected one holding Visual "
                           "Genome's objects_vocab.txt and attributes_vocab.txt)")
    out = {}
    for key, name in (("objects", "objects_vocab.txt"), ("attributes", "attributes_vocab.txt")):
        p = os.path.join(path, name)
        if not os.path.exists(p):
            out[key] = None
            continue
        with open(p, "r", encoding="utf-8") as f:
            out[key] = [line.strip().split(",")[0] for line in f if line.strip()]
    if out["objects"] is None and out["attributes"] is None:
        raise PredictError(f"--labels {path}: holds neither objects_vocab.txt nor "
                           "attributes_vocab.txt")
    return Labels(**out)


# --------------------------------------------------------------------------- requests


def _describe_fields(task: FinetuneTask) -> str:
    return ", ".join(f"{n}{'' if req else ' (optional)'}"
                     for n, (_, req, _) in task.predict_fields.items())


def _images_hint(task: FinetuneTask) -> str:
    n = task.predict_images
    return (f"{n} image{'s' if n > 1 else ''} (--image{' given ' + str(n) + ' times' if n > 1 else ''}"
            f", or \"image\"{'s' if n > 1 else ''} in a requests file)")


def normalize_request(task: FinetuneTask, raw: Dict[str, Any], where: str, number: int,
                      base_dir: Optional[str] = None) -> Dict[str, Any]:
    """A request checked against the task's fields: ``id`` (the request's ``id`` or
    ``question_id``, else ``number``), ``number``, ``where``, ``image_paths`` (relative paths are taken
    from ``base_dir``), the fields (a ``"texts"`` field as a list)."""
    if not isinstance(raw, dict):
        raise PredictError(f"{where}: a request is a JSON object, got {type(raw).__name__}")
    imgs = raw.get("images", raw.get("image"))
    if isinstance(imgs, str):
        imgs = [imgs]
    if (not isinstance(imgs, list) or not imgs
            or not all(isinstance(p, str) and p for p in imgs)):
        raise PredictError(f"{where}: no image: task {task.name} takes "
                           f"{_images_hint(task)}, got {imgs!r}")
    if len(imgs) != task.predict_images:
        raise PredictError(f"{where}: task {task.name} takes {_images_hint(task)}, got "
                           f"{len(imgs)}: {imgs}")
    paths = [p if base_dir is None or os.path.isabs(p) else os.path.join(base_dir, p)
             for p in imgs]
    rid = raw.get("id", raw.get("question_id"))
    out: Dict[str, Any] = {"id": number if rid is None else rid, "number": number,
                           "where": where, "image_paths": paths}
    for name, (kind, required, _) in task.predict_fields.items():
        v = raw.get(name)
        if v is None:
            if required:
                raise PredictError(f"{where}: no {name!r} (task {task.name} takes "
                                   f"{_describe_fields(task)})")
            continue
        if kind == "texts":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v):
                raise PredictError(f"{where}: {name!r} must be a text or a non-empty list of "
                                   f"texts, got {v!r:.80}")
        elif not isinstance(v, str):
            raise PredictError(f"{where}: {name!r} must be a text (a string), got "
                               f"{type(v).__name__} {v!r:.60}")
        out[name] = v
    return out


def read_requests(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(where, request)`` of every non-blank line of a JSON-lines file (``where``:
    ``FILE:LINE``); a line that is not a JSON object raises :class:`PredictError`."""
    try:
        f = open(path, "r", encoding="utf-8-sig")
    except FileNotFoundError:
        raise PredictError(f"--requests {path}: no such file") from None
    except OSError as e:
        raise PredictError(f"--requests {path}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictError(f"{where}: not a JSON line ({e.msg} at column "
                                   f"{e.colno})") from None
            if not isinstance(obj, dict):
                raise PredictError(f"{where}: a request is a JSON object, got "
                                   f"{type(obj).__name__}")
            yield where, obj


# --------------------------------------------------------------------------- the context


class PredictContext:
    """What a task's ``predict_requests`` / ``predict_alignment`` use: the tokenizer (word by
    word, as the text dbs), the model's text length limit, the image inputs, batches and the
    model call (device, precision)."""

    def __init__(self, tokenizer: BertTokenizer, max_len: int, device: torch.device,
                 precision: str, batch_size: int, top_k: int, model_desc: str):
        self.tokenizer = tokenizer
        meta = tokenizer.meta()
        self.cls_, self.sep = int(meta["CLS"]), int(meta["SEP"])
        self.max_len = int(max_len)
        self.device = device
        self.precision = precision
        self.amp_dtype = amp_dtype(precision)
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        self.model_desc = model_desc

    # ------------------------------------------------------------- text
    def words(self, text: str, where: str, name: str) -> List[Tuple[str, List[int]]]:
        """The words of ``text`` (split on whitespace) with their token ids, words that give
        no token left out (the text db's tokens are their concatenation)."""
        out = []
        for w in text.split():
            ids = self.tokenizer.tokenize(w)
            if ids:
                out.append((w, ids))
        if not out:
            raise PredictError(f"{where}: {name} {text!r:.60} gives no token")
        return out

    def tokens(self, text: str, where: str, name: str) -> List[int]:
        """The token ids of ``text`` (as prepro writes them)."""
        return [t for _, ids in self.words(text, where, name) for t in ids]

    def fit(self, n: int, where: str, what: str) -> None:
        """A row of ``n`` tokens must fit the model's position table."""
        if n > self.max_len:
            raise PredictError(f"{where}: {what} is {n} tokens with [CLS]/[SEP], more than the "
                               f"model takes ({self.max_len}: max_position_embeddings of "
                               f"{self.model_desc}); shorten it")

    def text_row(self, text: str, where: str, name: str) -> Tuple[List[int], List[Tuple[str, int, int]]]:
        """``[CLS] text [SEP]`` (checked to fit) and the words' ``(word, first, end)``
        token positions in it."""
        words = self.words(text, where, name)
        row, spans = [self.cls_], []
        for w, ids in words:
            spans.append((w, len(row), len(row) + len(ids)))
            row.extend(ids)
        row.append(self.sep)
        self.fit(len(row), where, f"the {name}")
        return row, spans

    # ------------------------------------------------------------- images and batches
    @staticmethod
    def image_inputs(img: ImageFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        return img.inputs()

    def chunks(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for st in range(0, len(items), self.batch_size):
            yield items[st:st + self.batch_size]

    def to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, batch: Dict[str, Any], **kw: Any) -> torch.Tensor:
        """``model(batch, compute_loss=False)`` on the device, under ``--precision``'s
        autocast, as float32 on the CPU."""
        batch = self.to_device(batch)
        with self.autocast():
            out = model(batch, compute_loss=False, **kw)
        return out.float().cpu()


# --------------------------------------------------------------------------- alignment


@dataclass
class Alignment:
    """UNITER's word-region alignment of one sentence and its image(s): ``plan[w, r]`` is the
    WRA transport plan's mass between word ``w`` (summed over its tokens) and region ``r``;
    ``regions[r]`` = (image index, region index); ``token_plans`` the plan of each encoded row
    as IPOT gives it, transposed to [text tokens ([CLS], ..., [SEP]), regions of the row];
    ``distances`` each row's WRA distance trace(C T)."""
    words: List[str]
    regions: List[Tuple[int, int]]
    plan: np.ndarray
    token_plans: List[np.ndarray]
    costs: List[np.ndarray]
    distances: List[float]

    def strongest(self) -> List[int]:
        """Each word's region (index into :attr:`regions`) of largest mass."""
        return [int(i) for i in self.plan.argmax(axis=1)]

    def to_json(self) -> Dict[str, Any]:
        return {"words": self.words, "regions": [list(r) for r in self.regions],
                "plan": self.plan.tolist(), "wra_distance": self.distances}


@torch.no_grad()
def word_region_alignment(model: torch.nn.Module, batch: Dict[str, Any],
                          words: Sequence[Tuple[str, int, int]],
                          regions: Sequence[Sequence[Tuple[int, int]]],
                          ctx: PredictContext) -> Alignment:
    """The WRA plan as UNITER's ITM/WRA objective computes it (``model/pretrain.py``): the
    model's final hidden states of each row's text tokens and regions, their cosine cost
    (:func:`uniter_fast.ops.cost_matrix_cosine`) and the IPOT plan
    (:func:`uniter_fast.ops.ipot`, beta 0.5, 50 iterations); each word's rows summed.  The
    rows of ``batch`` hold the same sentence (NLVR2's paired model: one row per image); their
    plans side by side."""
    uniter = getattr(model, "uniter", None)
    if uniter is None:
        raise PredictError(f"{type(model).__name__} has no UNITER encoder (.uniter)")
    b = ctx.to_device(batch)
    use_types = getattr(model, "uses_img_type_ids", False)
    with ctx.autocast():
        seq = uniter(b["input_ids"], b["position_ids"], b["img_feat"], b["img_pos_feat"],
                     b["attn_masks"], b["gather_index"], output_all_encoded_layers=False,
                     txt_type_ids=b.get("txt_type_ids"),
                     img_type_ids=b.get("img_type_ids") if use_types else None)
    seq = seq.float()
    cols, token_plans, costs, dists, all_regions = [], [], [], [], []
    for r, regs in enumerate(regions):
        total = int(b["attn_masks"][r].sum())
        nbb = len(regs)
        tl = total - nbb
        txt, img = seq[r:r + 1, :tl], seq[r:r + 1, tl:total]
        cost = ops.cost_matrix_cosine(txt, img)                               # [1, tl, nbb]
        tp = torch.zeros(1, tl, dtype=torch.bool, device=seq.device)
        ip = torch.zeros(1, nbb, dtype=torch.bool, device=seq.device)
        plan = ops.ipot(cost, tp, ip)[0].t()                                  # [tl, nbb]
        token_plans.append(plan.cpu().numpy())
        costs.append(cost[0].cpu().numpy())
        dists.append(float((cost[0] * plan).sum()))
        cols.append(np.stack([token_plans[-1][s:e].sum(axis=0) for _, s, e in words]))
        all_regions.extend((int(i), int(j)) for i, j in regs)
    return Alignment(words=[w for w, _, _ in words], regions=all_regions,
                     plan=np.concatenate(cols, axis=1), token_plans=token_plans, costs=costs,
                     distances=dists)


# --------------------------------------------------------------------------- the predictor


@dataclass
class Result:
    """One request's answer: ``request`` (the checked request, with ``images``: the
    features), ``answer`` (the task's JSON object)."""
    request: Dict[str, Any]
    answer: Dict[str, Any]
    alignment: Optional[Alignment] = field(default=None, repr=False)

    def to_json(self) -> Dict[str, Any]:
        out = {"id": self.request["id"], "images": list(self.request["image_paths"])}
        out.update(self.answer)
        if self.alignment is not None:
            out["alignment"] = self.alignment.to_json()
        return out


def _head_hint(sd_keys: Iterable[str], task: FinetuneTask) -> str:
    """Which registered tasks' heads a state dict holds, when not ``task``'s (a checkpoint
    of another task)."""
    keys = list(sd_keys)
    found, names = [], set()
    for name, cls in TASKS.items():
        heads = [p for p in cls.head_prefixes if any(k.startswith(p + ".") for k in keys)]
        if heads and cls.head_prefixes[0] in heads:
            found.append(f"{name} ({', '.join(p + '.*' for p in heads)})")
            names.add(name)
    if not found or task.name in names:
        return ""
    return f"; its weights hold the head of: {', '.join(found)} (wrong --task?)"


def _task_args(task: FinetuneTask, options: Optional[Dict[str, Any]]) -> argparse.Namespace:
    """The task's predict options (their defaults, then ``options``)."""
    p = argparse.ArgumentParser(add_help=False)
    task.add_predict_args(p)
    ns = p.parse_args([])
    for k, v in (options or {}).items():
        if not hasattr(ns, k):
            known = sorted(k for k in vars(ns) if k not in task.predict_fields)
            raise PredictError(f"task {task.name} has no predict option {k!r} (it has "
                               f"{known or 'none'})")
        setattr(ns, k, v)
    return ns


class Predictor:
    """A task model and the detector, ready to answer requests (see the module docstring).

    ``task``: a registered task name or a task object; ``checkpoint``: a fine-tuning run
    directory (its ``ckpt/``, a tag directory) or a plain ``.pt`` (then ``config``, the
    training config, or ``model_config``); ``detector``: the detector weights (either public
    layout); the tokenizer: ``vocab`` (a BERT ``vocab.txt``), ``tokenizer_dir`` or a
    :class:`~uniter_fast.prepro.BertTokenizer`.  The box rule (``conf_th``, ``max_bb``,
    ``min_bb``; ``num_bb`` alone: a fixed count) defaults to the run's config, as the model
    was trained on dbs extracted with it; ``preset``/``min_size``/``max_size`` the detector's
    image sizes; ``precision`` (fp32, bf16, fp16) the detector's convolutions and the model's
    autocast; ``options``: the task's predict options (VQA ``ans2label``, NLVR2 ``model``,
    ``use_img_type``); ``compile`` (True / False; None: :data:`uniter_fast.model.compile.
    COMPILE_DEFAULT` for the device) builds the task model under
    :func:`uniter_fast.model.compile.compiling`, so that it compiles at its first batch
    with the ``torch.compile`` backend ``compile_backend``, as ``infer --compile``."""

    def __init__(self, task: Union[str, FinetuneTask], checkpoint: str, detector: str, *,
                 vocab: Optional[str] = None, tokenizer_dir: Optional[str] = None,
                 tokenizer: Optional[BertTokenizer] = None, tag: Optional[str] = None,
                 config: Optional[str] = None, model_config: Optional[str] = None,
                 img_dim: Optional[int] = None, conf_th: Optional[float] = None,
                 max_bb: Optional[int] = None, min_bb: Optional[int] = None,
                 num_bb: Optional[int] = None, preset: str = "uniter",
                 min_size: Optional[int] = None, max_size: Optional[int] = None,
                 precision: str = "fp32", device: Optional[str] = None,
                 cache_dir: Optional[str] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 detector_batch_size: int = 2, top_k: int = DEFAULT_TOP_K,
                 options: Optional[Dict[str, Any]] = None, labels: Optional[str] = None,
                 trust_checkpoint: bool = False, compile: Optional[bool] = None,
                 compile_backend: str = "inductor"):
        self.task = get_task(task) if isinstance(task, str) else task
        if not self.task.predict_fields:
            raise PredictError(f"task {self.task.name} has no predict")
        for name, v in (("batch_size", batch_size), ("detector_batch_size", detector_batch_size),
                        ("top_k", top_k)):
            if not isinstance(v, int) or v < 1:
                raise PredictError(f"--{name} must be >= 1, got {v!r}")
        if precision not in ("fp32", "bf16", "fp16"):
            raise PredictError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision
        #: whether the task model compiles (``compile``, else the device's default)
        self.compiled = use_compile(compile, self.device)
        self.compile_backend = compile_backend
        self.labels = load_labels(labels)
        self.tokenizer = self._tokenizer(vocab, tokenizer_dir, tokenizer)
        self.args = _task_args(self.task, options)
        for k, v in (("checkpoint", checkpoint), ("tag", tag), ("config", config),
                     ("model_config", model_config), ("img_dim", img_dim),
                     ("conf_th", conf_th), ("max_bb", max_bb), ("min_bb", min_bb),
                     ("num_bb", num_bb), ("compressed_db", None)):
            setattr(self.args, k, v)
        if num_bb is not None and conf_th is None:
            self.args.conf_th = -1                 # a fixed box count, as extract's --num_bb
        self.model, self.cfg = self._model(checkpoint, tag, trust_checkpoint)
        emb = self.model.uniter.embeddings
        self.img_dim = int(self.model.uniter.img_dim)
        vocab_end = int(self.tokenizer.meta()["v_range"][1])
        if vocab_end > emb.word_embeddings.num_embeddings:
            raise PredictError(f"--vocab/--tokenizer: the vocabulary has {vocab_end} tokens, "
                               f"the model's word embeddings {emb.word_embeddings.num_embeddings}"
                               f" ({self._model_desc()}): not the vocabulary this model was "
                               "trained with")
        self.ctx = PredictContext(self.tokenizer, emb.position_embeddings.num_embeddings,
                                  self.device, precision, batch_size, top_k, self._model_desc())
        self.extractor, settings = self._extractor(detector, preset, min_size, max_size)
        self.detector_batch_size = detector_batch_size
        self.cache = FeatureCache(settings, cache_dir)
        #: images run through the detector (cache misses)
        self.detector_images = 0

    # ------------------------------------------------------------- setup
    @staticmethod
    def _tokenizer(vocab, tokenizer_dir, tokenizer) -> BertTokenizer:
        if tokenizer is not None:
            return tokenizer
        if (vocab is None) == (tokenizer_dir is None):
            raise PredictError("give the BERT vocabulary the text dbs were made with: --vocab "
                               "vocab.txt or --tokenizer DIR (one of them)")
        try:
            if vocab is not None:
                return BertTokenizer.from_vocab(vocab)
            return BertTokenizer.from_dir(tokenizer_dir)
        except PreproError as e:
            raise PredictError(f"--{'vocab' if vocab else 'tokenizer'}: {e}") from None

    def _model_desc(self) -> str:
        return f"model config {self.cfg.get('model_config')} of --checkpoint {self.args.checkpoint}"

    def _model(self, checkpoint: str, tag: Optional[str], trust: bool):
        task = self.task
        with ckpt_lib.trusting(trust):
            try:
                source = resolve_checkpoint(checkpoint, tag)
            except ValueError as e:
                raise PredictError(str(e)) from None
            try:
                cfg = inference_config(self.args, source, task)
            except ValueError as e:
                raise PredictError(f"--checkpoint {checkpoint}: {e}") from None
            try:
                with (compiling(backend=self.compile_backend) if self.compiled
                      else contextlib.nullcontext()):
                    model = task.predict_model(self.args, cfg, source)
            except PredictError:
                raise
            except (ValueError, KeyError, RuntimeError) as e:
                hint = ""
                try:
                    from ..tasks.inference import load_weights
                    hint = _head_hint(load_weights(source), task)
                except Exception:        # the hint is optional: the error is the message
                    pass
                raise PredictError(f"--checkpoint {checkpoint} cannot be loaded as a "
                                   f"{task.name} model: {e}{hint}") from None
        self.source = source
        return model.to(self.device).eval(), cfg

    def compile_counts(self) -> Optional[Dict[str, int]]:
        """Dynamo's counts so far when the model compiles (compilations, graphs,
        graph breaks: :func:`uniter_fast.model.compile.compile_counts`), else None."""
        return compile_counts() if self.compiled else None

    def box_rule(self) -> Dict[str, Any]:
        """The detector's box rule: the run's config with the given overrides."""
        cfg = self.cfg
        conf_th = cfg.get("conf_th", DEFAULT_CONF_TH)
        if conf_th == -1:
            return {"num_bb": int(cfg.get("num_bb", DEFAULT_NUM_BB))}
        return {"conf_th": float(conf_th), "max_bb": int(cfg.get("max_bb", DEFAULT_MAX_BB)),
                "min_bb": int(cfg.get("min_bb", DEFAULT_MIN_BB))}

    def _extractor(self, detector: str, preset: str, min_size, max_size):
        rule = self.box_rule()
        try:
            check_box_rule(rule.get("conf_th", -1), rule.get("max_bb", 1), rule.get("min_bb", 1),
                           rule.get("num_bb"))
            weights = find_weights_file(detector)
            dcfg = detector_config(preset, min_size, max_size)
            ext = make_extractor(weights, preset, min_size=min_size, max_size=max_size,
                                 device=str(self.device), precision=self.precision, **rule)
        except (WeightsError, ExtractError) as e:
            raise PredictError(f"--detector {detector}: {e}") from None
        except ValueError as e:
            raise PredictError(f"--detector {detector}: {e}") from None
        width = int(ext.cfg.res5_channels)
        if width != self.img_dim:
            raise PredictError(f"--detector {detector}: its region features are {width} wide, "
                               f"but the model ({self._model_desc()}) takes img_dim "
                               f"{self.img_dim}: use the detector whose image dbs the model was "
                               "trained on (or the training config's img_dim)")
        settings = dict(_weights_identity(weights), preset=preset, min_size=dcfg.min_size,
                        max_size=dcfg.max_size, precision=self.precision, **rule)
        return ext, settings

    # ------------------------------------------------------------- features
    def features(self, paths: Sequence[str], wheres: Optional[Sequence[str]] = None
                 ) -> List[ImageFeatures]:
        """The features of the image files ``paths`` (cached by content; the images not in
        the cache go through the detector, ``detector_batch_size`` per forward)."""
        wheres = list(wheres) if wheres is not None else ["--image"] * len(paths)
        out: List[Optional[ImageFeatures]] = [None] * len(paths)
        #: cache key -> (path, bytes, digest, the indices of ``paths`` it serves, where)
        todo: Dict[str, Tuple[str, bytes, str, List[int], str]] = {}
        for i, (p, where) in enumerate(zip(paths, wheres)):
            data = self._read(p, where)
            digest = hashlib.sha256(data).hexdigest()
            key = self.cache.key(digest)
            rec = self.cache.get(key) if key not in todo else None
            if rec is not None:
                out[i] = ImageFeatures.from_record(p, digest, rec)
            elif key in todo:
                todo[key][3].append(i)
            else:
                todo[key] = (p, data, digest, [i], where)
        if not todo:
            return out  # type: ignore[return-value]
        items = list(todo.items())
        prepared = []
        for _, (p, data, _, _, where) in items:
            try:
                prepared.append(self.extractor.prepare(data))
            except ImageError as e:
                raise PredictError(f"{where}: image {p}: {str(e).split(': ', 1)[-1]}") from None
        recs: List[Optional[Dict[str, Any]]] = [None] * len(items)
        for group in aspect_batches([im.size for im in prepared], self.detector_batch_size):
            for j, rec in zip(group, self.extractor.run([prepared[j] for j in group])):
                recs[j] = rec
        self.detector_images += len(items)
        for (key, (p, _, digest, idx, where)), rec in zip(items, recs):
            if rec is None or np.asarray(rec["conf"]).shape[0] == 0:
                raise PredictError(f"{where}: image {p}: the detector found no region")
            stored = ImageFeatures.from_record(p, digest, rec).record()
            self.cache.put(key, stored)
            for i in idx:
                out[i] = ImageFeatures.from_record(paths[i], digest, stored)
        return out  # type: ignore[return-value]

    @staticmethod
    def _read(path: str, where: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise PredictError(f"{where}: image {path}: no such file") from None
        except IsADirectoryError:
            raise PredictError(f"{where}: image {path}: is a directory, not an image "
                               "file") from None
        except OSError as e:
            raise PredictError(f"{where}: image {path}: cannot be read "
                               f"({e.strerror or e})") from None

    # ------------------------------------------------------------- answers
    def task_request(self, raw: Dict[str, Any], where: str, number: int,
                     base_dir: Optional[str] = None) -> Dict[str, Any]:
        """One request checked against the task's fields (:func:`normalize_request`)."""
        return normalize_request(self.task, raw, where, number, base_dir)

    def requests(self, raw: Iterable[Tuple[str, Dict[str, Any]]], base_dir: Optional[str] = None
                 ) -> List[Dict[str, Any]]:
        """Checked requests of ``(where, request)`` pairs, numbered in order."""
        return [normalize_request(self.task, r, where, n, base_dir)
                for n, (where, r) in enumerate(raw)]

    def answer(self, requests: Sequence[Union[Dict[str, Any], Tuple[str, Dict[str, Any]]]],
               base_dir: Optional[str] = None, align: bool = False) -> List[Result]:
        """The answers of ``requests`` (dicts with ``image``/``images`` and the task's
        fields, or ``(where, dict)`` pairs; relative image paths from ``base_dir``), in
        order; ``align``: with each request's word-region alignment."""
        pairs = [r if isinstance(r, tuple) else (f"request {n}", r)
                 for n, r in enumerate(requests)]
        return self.answer_checked(self.requests(pairs, base_dir), align)

    def answer_checked(self, reqs: List[Dict[str, Any]], align: bool = False) -> List[Result]:
        """:meth:`answer` on requests :meth:`requests` already checked."""
        paths = [p for r in reqs for p in r["image_paths"]]
        wheres = [r["where"] for r in reqs for _ in r["image_paths"]]
        feats = iter(self.features(paths, wheres))
        for r in reqs:
            r["images"] = [next(feats) for _ in r["image_paths"]]
        with torch.no_grad():
            answers = self.task.predict_requests(self.model, reqs, self.ctx)
        results = [Result(r, a) for r, a in zip(reqs, answers)]
        if align:
            for res in results:
                self.align(res)
        return results

    def ask(self, image: Union[str, Sequence[str]], **fields: Any) -> Result:
        """One request: ``p.ask("kitchen.jpg", question="what is on the table?")``."""
        return self.answer([{"image": image, **fields}])[0]

    def align(self, result: Result) -> Alignment:
        """The word-region alignment of a result's request (kept on the result)."""
        batch, words, regions = self.task.predict_alignment(result.request, result.answer,
                                                            self.ctx)
        result.alignment = word_region_alignment(self.model, batch, words, regions, self.ctx)
        return result.alignment

    # ------------------------------------------------------------- pictures
    def picture(self, result: Result, *, alignment: bool = True, image_size: int = 480,
                max_boxes: int = 10):
        """``(PIL image, layout)`` of a result (:func:`uniter_fast.predict.draw.render`)."""
        from . import draw
        if alignment and result.alignment is None:
            self.align(result)
        return draw.render(result.request, self.task.predict_picture(result.request,
                                                                     result.answer),
                           result.alignment if alignment else None, self.labels,
                           image_size=image_size, max_boxes=max_boxes)

    def draw(self, result: Result, path: str, **kw: Any):
        """Write a result's picture to ``path`` (PNG, ...); returns its layout."""
        image, layout = self.picture(result, **kw)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fmt = os.path.splitext(path)[1].lstrip(".").upper() or "PNG"
        image.save(tmp, format={"JPG": "JPEG"}.get(fmt, fmt))
        os.replace(tmp, path)
        return layout
