"""UNITER's joint vision-language encoder (``UniterModel``), drop-in for ``model/model.py``."""
import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import UniterConfig, config_path
from ..constants import BOX_FEATURE_DIM, LAYER_NORM_EPS
from .compile import register_lazy_compile
from .layer import BertLayer, BertPooler, LayerNorm, select_rows

logger = logging.getLogger(__name__)

#: > 0 while the caller loads the weights itself right after building (no random-init notice)
_LOADING_NEXT = [0]


@contextlib.contextmanager
def weights_loaded_next():
    """Build models with ``from_pretrained(config, None)`` without the "randomly initialised"
    notice: the caller loads a checkpoint into them next (inference, export)."""
    _LOADING_NEXT[0] += 1
    try:
        yield
    finally:
        _LOADING_NEXT[0] -= 1

__all__ = ["UniterConfig", "UniterPreTrainedModel", "UniterTextEmbeddings",
           "UniterImageEmbeddings", "UniterEncoder", "UniterModel", "LoadReport",
           "adapt_state_dict", "load_checkpoint", "hidden_size_mismatch", "encoder_prefix", "check_encoder_batch",
           "weights_loaded_next"]


def _load_config(config_file: Union[str, Dict[str, Any], UniterConfig]) -> UniterConfig:
    if isinstance(config_file, UniterConfig):
        return config_file
    if isinstance(config_file, dict):
        return UniterConfig.from_dict(config_file)
    if isinstance(config_file, str) and not config_file.endswith(".json") and "/" not in config_file:
        return UniterConfig.from_json_file(config_path(config_file))
    return UniterConfig.from_json_file(config_file)


class UniterPreTrainedModel(nn.Module):
    """Weight initialisation and ``from_pretrained`` as in UNITER."""

    def __init__(self, config: UniterConfig, *inputs, **kwargs):
        super().__init__()
        if not isinstance(config, UniterConfig):
            raise ValueError(f"config of {type(self).__name__} must be a UniterConfig, "
                             f"got {type(config).__name__}")
        self.config = config
        register_lazy_compile(self)      # inside compile.compiling() only

    def validate(self, *args, **kwargs) -> None:
        """Check the inputs of ``forward(*args, **kwargs)`` eagerly, raising ``ValueError``
        naming a problem (the task models check their batches; see their ``validate``).
        Under ``torch.compile`` a forward does not check (the checks read tensors on the
        host); :func:`uniter_fast.compile_model` calls this before each compiled call."""

    def init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, config_file, state_dict: Optional[Mapping[str, torch.Tensor]],
                        *inputs, **kwargs):
        """Build ``cls(config, *inputs, **kwargs)`` and load a checkpoint into it.

        ``config_file``: a JSON path, a shipped config name ("uniter-base"), a
        dict or a UniterConfig.  ``state_dict``: a UNITER/BERT state dict, as
        saved by the original code, by ``uniter_fast.export`` or wrapped by
        DDP/DeepSpeed; see :func:`load_checkpoint` for the key adaptation
        (``module.``, ``bert.``, ``uniter.`` prefixes, TF ``gamma``/``beta``)
        and what is logged.  Raises ``ValueError`` when the checkpoint does not
        provide the encoder (task heads may be missing) and ``RuntimeError`` on
        a shape mismatch.  ``state_dict=None`` starts from random weights (logged).
        """
        config = _load_config(config_file)
        model = cls(config, *inputs, **kwargs)
        if state_dict is None:
            if not _LOADING_NEXT[0]:
                logger.warning("%s: no checkpoint given; every weight is randomly initialised",
                               cls.__name__)
            return model
        load_checkpoint(model, state_dict,
                        config_name=config_file if isinstance(config_file, str) else None)
        return model


# ----------------------------------------------------------------------------- checkpoint loading

#: the children of ``UniterModel``: a checkpoint key ``[uniter.|bert.]<one of these>.…`` is an
#: encoder weight, whatever prefix its checkpoint used
ENCODER_SUBMODULES = ("embeddings", "img_embeddings", "encoder", "pooler")
#: prefixes under which checkpoints store the encoder (UNITER, BERT / ``convert_ckpt.py``)
ENCODER_PREFIXES = ("uniter.", "bert.")
#: prefix added by DDP / DeepSpeed / ``torch.compile``-free wrappers
WRAPPER_PREFIX = "module."
#: keys under which a checkpoint file may nest the state dict (DeepSpeed: ``module``)
NESTED_STATE_KEYS = ("module", "model", "state_dict")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    ``loaded``: model keys filled from the checkpoint (a tied weight counts as
    loaded when its twin was); ``missing``: model keys left at their
    initialisation; ``unexpected``: checkpoint keys (after adaptation) the model
    has no place for; ``renamed``: checkpoint key -> model key where they differ;
    ``exempt``: missing encoder keys that were allowed (image embeddings when
    starting from a text-only BERT checkpoint).
    """
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    renamed: Dict[str, str] = field(default_factory=dict)
    exempt: List[str] = field(default_factory=list)


def encoder_prefix(model: nn.Module) -> str:
    """Key prefix of the (first) :class:`UniterModel` inside ``model`` ("" for the encoder itself)."""
    for name, module in model.named_modules():
        if isinstance(module, UniterModel):
            return name + "." if name else ""
    raise ValueError(f"{type(model).__name__} contains no UniterModel")


def _unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"checkpoint must be a state dict (a mapping of names to tensors), "
                         f"got {type(state_dict).__name__}")
    if all(torch.is_tensor(v) for v in state_dict.values()):
        return state_dict
    for key in NESTED_STATE_KEYS:
        inner = state_dict.get(key)
        if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v) for v in inner.values()):
            logger.info("checkpoint: using the state dict nested under %r", key)
            return inner
    bad = next(k for k, v in state_dict.items() if not torch.is_tensor(v))
    raise ValueError(f"checkpoint is not a state dict: key {bad!r} holds a "
                     f"{type(state_dict[bad]).__name__}, not a tensor (and no "
                     f"{'/'.join(NESTED_STATE_KEYS)} entry holds one)")


def adapt_state_dict(state_dict: Mapping[str, Any], model: nn.Module
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], bool]:
    """Map checkpoint keys onto ``model``'s names.

    * a nested ``{"module": sd}`` (DeepSpeed model states) is unwrapped;
    * leading ``module.`` (DDP / DeepSpeed) prefixes are stripped;
    * TF-style ``….gamma`` / ``….beta`` become ``….weight`` / ``….bias`` (as UNITER does);
    * encoder keys (``embeddings.``, ``img_embeddings.``, ``encoder.``, ``pooler.`` under
      ``uniter.``, ``bert.`` or no prefix) are put under the model's encoder prefix, so
      an encoder-only state dict loads into a task model and a task model's into
      ``UniterModel``; every other key is kept as it is.

    Returns ``(adapted, renamed, from_bert)``; two checkpoint keys that map to one
    model key raise ``ValueError``.
    """
    state_dict = _unwrap_state_dict(state_dict)
    own_keys = model.state_dict().keys()
    strip_module = not any(k.startswith(WRAPPER_PREFIX) for k in own_keys)
    enc = encoder_prefix(model)
    adapted: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    renamed: Dict[str, str] = {}
    from_bert = False
    for key, value in state_dict.items():
        new = key
        while strip_module and new.startswith(WRAPPER_PREFIX):
            new = new[len(WRAPPER_PREFIX):]
        head, _, last = new.rpartition(".")
        if last in ("gamma", "beta"):
            new = (head + "." if head else "") + ("weight" if last == "gamma" else "bias")
        rest = None
        for p in ENCODER_PREFIXES:
            if new.startswith(p) and new[len(p):].split(".", 1)[0] in ENCODER_SUBMODULES:
                rest = new[len(p):]
                from_bert |= p == "bert."
                break
        if rest is None and new.split(".", 1)[0] in ENCODER_SUBMODULES and new not in own_keys:
            rest = new
        if rest is not None:
            new = enc + rest
        if new in adapted:
            raise ValueError(f"checkpoint keys {source[new]!r} and {key!r} both map to model key "
                             f"{new!r}")
        adapted[new], source[new] = value, key
        if new != key:
            renamed[key] = new
    return adapted, renamed, from_bert


def hidden_size_mismatch(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                         ) -> Optional[Tuple[int, int]]:
    """(checkpoint's hidden size, model's) when they differ, read off the word embeddings
    (any prefix); None when they agree or cannot be told."""
    def width(sd):
        for k, v in sd.items():
            if k.endswith("embeddings.word_embeddings.weight") and v.dim() == 2:
                return int(v.shape[1])
        return None
    a, b = width(state), width(own)
    return (a, b) if a is not None and b is not None and a != b else None


def load_checkpoint(model: nn.Module, state_dict: Mapping[str, Any], *,
                    require_encoder: bool = True, config_name: Optional[str] = None
                    ) -> LoadReport:
    """Load a pretrained / fine-tuned checkpoint into a UNITER model, non-strictly
    but never silently.

    Keys are adapted by :func:`adapt_state_dict`; values of any floating dtype
    (fp16/bf16 saves) are cast to the model's.  A shape mismatch raises
    ``RuntimeError``.  With ``require_encoder`` (default), every encoder weight
    (``uniter.*`` of a task model) must come from the checkpoint, otherwise
    ``ValueError`` lists the missing keys; only task heads may stay at their
    initialisation (and, from a text-only BERT checkpoint, the image embeddings).
    What loaded, what did not and what was unused is logged and returned.
    """
    name = type(model).__name__
    adapted, renamed, from_bert = adapt_state_dict(state_dict, model)
    if not adapted:
        raise ValueError(f"{name}: the checkpoint is an empty state dict; pass state_dict=None "
                         "to start from random weights")
    own = model.state_dict(keep_vars=True)
    mismatch = [f"size mismatch for {k}: copying a param with shape {tuple(v.shape)} from "
                f"checkpoint, the shape in current model is {tuple(own[k].shape)}"
                for k, v in adapted.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatch:
        size = hidden_size_mismatch(adapted, own)
        if size is not None:
            cfg_name = f"model config {config_name}" if config_name else "the model config"
            raise RuntimeError(f"{name}: checkpoint hidden size {size[0]}, {cfg_name} has "
                               f"{size[1]} (a checkpoint of another model size; "
                               f"{len(mismatch)} weights differ in shape)")
        hint = ""
        if len(mismatch) == 1 and "token_type_embeddings" in mismatch[0]:
            hint = ("\n\t(token_type_embeddings with 3 rows is a fine-tuned NLVR2 checkpoint: build "
                    "the model, call init_type_embedding(), then load_state_dict it)")
        raise RuntimeError(f"Error(s) in loading state_dict for {name}:\n\t"
                           + "\n\t".join(mismatch) + hint)
    usable = {k: v for k, v in adapted.items() if k in own}
    model.load_state_dict(usable, strict=False)
    # a tied weight (MLM decoder = word embeddings) is loaded when its twin is
    by_tensor: Dict[int, List[str]] = {}
    for k, t in own.items():
        by_tensor.setdefault(id(t), []).append(k)
    loaded_ids = {id(own[k]) for k in usable}
    report = LoadReport(renamed=renamed)
    for k, t in own.items():
        (report.loaded if id(t) in loaded_ids else report.missing).append(k)
    report.unexpected = [k for k in adapted if k not in own]
    enc = encoder_prefix(model)
    enc_missing = [k for k in report.missing if k.startswith(enc)]
    if from_bert:
        report.exempt = [k for k in enc_missing if k.startswith(enc + "img_embeddings.")]
        enc_missing = [k for k in enc_missing if k not in report.exempt]
    if require_encoder and enc_missing:
        n_enc = sum(1 for k in own if k.startswith(enc))
        back = {v: k for k, v in renamed.items()}
        sample = [back.get(k, k) for k in list(adapted)[:5]]
        raise ValueError(
            f"{name}: the checkpoint does not provide the UNITER encoder: {len(enc_missing)} of "
            f"{n_enc} encoder tensors are missing: {_short(enc_missing)}. Checkpoint keys look "
            f"like {sample}; expected e.g. {enc + 'embeddings.word_embeddings.weight'!r} "
            f"(prefixes {WRAPPER_PREFIX!r}, 'bert.', 'uniter.' are adapted)")
    logger.info("%s: loaded %d of %d tensors from the checkpoint%s", name, len(report.loaded),
                len(own), f" ({len(renamed)} keys renamed, e.g. {next(iter(renamed.items()))})"
                if renamed else "")
    if report.exempt:
        logger.warning("%s: BERT checkpoint has no image embeddings; randomly initialised: %s",
                       name, report.exempt)
    if report.missing:
        logger.warning("Weights of %s not initialized from pretrained model: %s", name,
                       report.missing)
    if report.unexpected:
        logger.info("Weights from pretrained model not used in %s: %s", name, report.unexpected)
    return report


def _short(keys: Sequence[str], n: int = 10) -> str:
    return str(list(keys[:n]))[:-1] + (f", ... ({len(keys) - n} more)]" if len(keys) > n else "]")


class UniterTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
               + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(emb))


class UniterImageEmbeddings(nn.Module):
    def __init__(self, config, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.pos_layer_norm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.pos_linear = nn.Linear(BOX_FEATURE_DIM, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):
        if img_masks is not None:
            # Row 0 of mask_embedding means "not masked" and contributes zero
            # (the original zeroes that row in place on every call; multiplying
            # by the mask gives the same output without writing a parameter).
            m = img_masks.long()
            img_feat = img_feat + self.mask_embedding(m) * (m != 0).unsqueeze(-1).to(img_feat.dtype)
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        emb = transformed_im + transformed_pos + type_embeddings
        return self.dropout(self.LayerNorm(emb))


class UniterEncoder(nn.Module):
    #: With ``output_rows``, the last layer computes only those rows after its attention
    #: (keys and values still come from every position): the same rows as running the
    #: whole layer and selecting them, with the output projection and the feed-forward
    #: block on n rows instead of B * S.  False: the whole last layer, then the selection
    #: (UNITER's computation; the benchmarks' reference columns).
    prune_last_layer = True

    def __init__(self, config):
        super().__init__()
        layer = BertLayer(config)
        self.layer = nn.ModuleList([copy.deepcopy(layer) for _ in range(config.num_hidden_layers)])

    def forward(self, input_, attention_mask, output_all_encoded_layers=True, output_rows=None):
        """attention_mask: [batch, seq], 1 = real token.  ``output_rows`` (flat indices into
        [batch * seq], only with ``output_all_encoded_layers=False``): return the last
        layer's rows [n, H] instead of the whole [batch, seq, H]."""
        if output_rows is not None and output_all_encoded_layers:
            raise ValueError("output_rows selects rows of the last layer only: pass "
                             "output_all_encoded_layers=False with it")
        prune = output_rows is not None and self.prune_last_layer and len(self.layer) > 0
        all_layers = []
        hidden = input_
        last = len(self.layer) - 1
        for i, layer_module in enumerate(self.layer):
            hidden = layer_module(hidden, attention_mask, output_rows if prune and i == last
                                  else None)
            if output_all_encoded_layers:
                all_layers.append(hidden)
        if output_rows is not None and not prune:
            hidden = select_rows(hidden, output_rows)
        if not output_all_encoded_layers:
            all_layers.append(hidden)
        return all_layers


def first_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """The flat row of each example's first position ([CLS], what the pooler reads) in
    [batch * seq]: ``output_rows`` for the pooled heads."""
    b, s = attention_mask.shape[:2]
    return torch.arange(b, device=attention_mask.device) * s


class UniterModel(UniterPreTrainedModel):
    """Single-stream encoder over [text tokens; image regions], compacted by ``gather_index``."""

    def __init__(self, config: UniterConfig, img_dim: int):
        super().__init__(config)
        if not isinstance(img_dim, int) or img_dim < 1:
            raise ValueError(f"img_dim must be a positive int, got {img_dim!r}")
        self.img_dim = img_dim
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self.init_weights)

    def _compute_txt_embeddings(self, input_ids, position_ids, txt_type_ids=None):
        return self.embeddings(input_ids, position_ids, txt_type_ids)

    def _compute_img_embeddings(self, img_feat, img_pos_feat, img_masks=None, img_type_ids=None):
        if img_type_ids is None:
            img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        img_type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        return self.img_embeddings(img_feat, img_pos_feat, img_type_embeddings, img_masks)

    def _compute_img_txt_embeddings(self, input_ids, position_ids, img_feat, img_pos_feat,
                                    gather_index, img_masks=None, txt_type_ids=None,
                                    img_type_ids=None):
        txt_emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids)
        img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids)
        if gather_index is None:
            return torch.cat([txt_emb, img_emb], dim=1)
        index = gather_index.long().unsqueeze(-1).expand(-1, -1, txt_emb.size(-1))
        return torch.gather(torch.cat([txt_emb, img_emb], dim=1), dim=1, index=index)

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                gather_index=None, img_masks=None, output_all_encoded_layers=True,
                txt_type_ids=None, img_type_ids=None, output_rows=None):
        """Encode; ``attention_mask`` is UNITER's ``attn_masks`` [batch, seq] (1 = real).
        ``output_rows`` (flat indices into [batch * seq], with
        ``output_all_encoded_layers=False``): the last layer's rows [n, H] only, the rows
        the heads read (:attr:`UniterEncoder.prune_last_layer`)."""
        img_feat = _to_param_dtype(img_feat, self)
        img_pos_feat = _to_param_dtype(img_pos_feat, self)
        if input_ids is None:
            emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids)
        elif img_feat is None:
            emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids)
        else:
            emb = self._compute_img_txt_embeddings(input_ids, position_ids, img_feat, img_pos_feat,
                                                   gather_index, img_masks, txt_type_ids,
                                                   img_type_ids)
        layers = self.encoder(emb, attention_mask, output_all_encoded_layers, output_rows)
        return layers if output_all_encoded_layers else layers[-1]


def _to_param_dtype(x: Optional[torch.Tensor], module: nn.Module) -> Optional[torch.Tensor]:
    """Cast float inputs to the model's parameter dtype (bf16/fp16 training)."""
    if x is None:
        return None
    dtype = module.embeddings.word_embeddings.weight.dtype
    return x.to(dtype) if x.dtype != dtype and x.is_floating_point() else x


# ----------------------------------------------------------------------------- batch checks

ENCODER_BATCH_KEYS = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
                      "gather_index")


def check_encoder_batch(uniter: "UniterModel", batch: Dict[str, Any], need: Sequence[str] = (),
                        what: str = "batch") -> None:
    """Raise ``ValueError`` naming the problem when ``batch`` cannot go through ``uniter``.

    Checks that the encoder keys and ``need`` are present, batch sizes agree,
    ``img_feat`` is [B, N, img_dim], ``img_pos_feat`` [B, N, 7], ``gather_index``
    and ``attn_masks`` are [B, joint_len], the text fits the position embeddings,
    and (one host sync) ``gather_index`` / ``input_ids`` / ``img_type_ids`` /
    ``txt_type_ids`` are in range and the features finite.
    """
    if not isinstance(batch, dict):
        raise ValueError(f"{what} must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in list(ENCODER_BATCH_KEYS) + list(need) if batch.get(k) is None]
    if missing:
        raise ValueError(f"{what} is missing {missing}")
    cfg = uniter.config
    ids, feat, pos = batch["input_ids"], batch["img_feat"], batch["img_pos_feat"]
    attn, gidx = batch["attn_masks"], batch["gather_index"]
    b = ids.size(0)
    for key in ("img_feat", "img_pos_feat", "attn_masks", "gather_index"):
        if batch[key].size(0) != b:
            raise ValueError(f"batch size mismatch: input_ids has {b} examples, "
                             f"{key} has {batch[key].size(0)}")
    if feat.dim() != 3 or feat.size(-1) != uniter.img_dim:
        raise ValueError(f"img_feat must be [B, N, img_dim={uniter.img_dim}], "
                         f"got {tuple(feat.shape)}")
    if pos.dim() != 3 or pos.size(1) != feat.size(1) or pos.size(-1) != BOX_FEATURE_DIM:
        raise ValueError(f"img_pos_feat must be [B, N={feat.size(1)}, {BOX_FEATURE_DIM}], "
                         f"got {tuple(pos.shape)}")
    if gidx.dim() != 2 or attn.dim() != 2 or gidx.size(1) != attn.size(1):
        raise ValueError(f"gather_index {tuple(gidx.shape)} and attn_masks {tuple(attn.shape)} "
                         f"must both be [B, joint_len]")
    if ids.size(1) > cfg.max_position_embeddings:
        raise ValueError(f"text length {ids.size(1)} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    pids = batch["position_ids"]
    if not torch.is_tensor(pids) or pids.dim() != 2 or pids.size(1) != ids.size(1) or \
            pids.size(0) not in (1, b):
        raise ValueError(f"position_ids must be [1 or B={b}, text length {ids.size(1)}], got "
                         f"{tuple(pids.shape) if torch.is_tensor(pids) else type(pids).__name__}")
    n_pos = uniter.embeddings.position_embeddings.num_embeddings
    n_types = uniter.embeddings.token_type_embeddings.num_embeddings
    # the embedding's real row count: VCR's init_word_embedding grows it past config.vocab_size
    n_words = uniter.embeddings.word_embeddings.num_embeddings
    typed = []
    for key, shape in (("img_type_ids", tuple(feat.shape[:2])), ("txt_type_ids", tuple(ids.shape))):
        t = batch.get(key)
        if t is not None:
            if tuple(t.shape) != shape:
                raise ValueError(f"{key} must have shape {shape}, got {tuple(t.shape)}")
            typed.append((key, t))
    tl, nbb = ids.size(1), feat.size(1)
    no = torch.zeros((), dtype=torch.bool, device=ids.device)

    def out_of_range(t, hi):
        return ((t.min() < 0) | (t.max() >= hi)).to(no.device) if t.numel() else no

    # one host sync for all data-dependent checks
    flags = torch.stack([out_of_range(gidx, tl + nbb), (~torch.isfinite(feat).all()).to(no.device),
                         (~torch.isfinite(pos).all()).to(no.device),
                         out_of_range(ids, n_words)]
                        + [out_of_range(t, n_types) for _, t in typed]
                        + [out_of_range(pids, n_pos)]).tolist()
    if flags[-1]:
        raise ValueError(f"position_ids out of range [0, max_position_embeddings={n_pos})")
    if flags[0]:
        raise ValueError(f"gather_index out of range: values must be in [0, {tl + nbb}) "
                         f"(text length {tl} + regions {nbb})")
    if flags[1]:
        raise ValueError("img_feat contains NaN or inf")
    if flags[2]:
        raise ValueError("img_pos_feat contains NaN or inf")
    if flags[3]:
        raise ValueError(f"input_ids out of range [0, {n_words}) of word_embeddings"
                         + (" (VCR's special tokens need init_word_embedding())"
                            if n_words == cfg.vocab_size else ""))
    for (key, _), bad in zip(typed, flags[4:]):
        if bad:
            raise ValueError(f"{key} out of range [0, {n_types}) of token_type_embeddings"
                             + (" (NLVR2 image types 1, 2 need init_type_embedding())"
                                if n_types == 2 and key == "img_type_ids" else ""))
