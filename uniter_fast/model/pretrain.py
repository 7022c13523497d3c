"""UNITER pretraining heads and losses (MLM, MRFR, MRC, MRC-KL, ITM + WRA), drop-in for ``model/pretrain.py``."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..constants import LAYER_NORM_EPS
from .layer import GELU, BertOnlyMLMHead, LayerNorm, select_rows
from .model import UniterModel, UniterPreTrainedModel, check_encoder_batch, first_rows

TASKS = ("mlm", "mrfr", "mrc", "mrc-kl", "itm")


class RegionFeatureRegression(nn.Module):
    """MRFR head; its output projection is img_linear's weight, transposed (tied)."""

    def __init__(self, hidden_size: int, feat_dim: int, img_linear_weight: nn.Parameter):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), GELU(),
                                 LayerNorm(hidden_size, eps=LAYER_NORM_EPS))
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, input_):
        return F.linear(self.net(input_), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC(-KL) head."""

    def __init__(self, hidden_size: int, label_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), GELU(),
                                 LayerNorm(hidden_size, eps=LAYER_NORM_EPS),
                                 nn.Linear(hidden_size, label_dim))

    def forward(self, input_):
        return self.net(input_)


def itm_ot_loss(itm_loss: torch.Tensor,
                ot_loss: Optional[Tuple[torch.Tensor, torch.Tensor]],
                itm_ot_lambda: float = 0.1) -> torch.Tensor:
    """UNITER's ITM + WRA objective from ``forward(batch, "itm")``'s outputs:

    ``itm_loss.mean() + itm_ot_lambda * (ot_pos.sum() − ot_neg.sum()) / (n_pos + n_neg)``.
    Safe when the batch has no positives or no negatives (those sums are 0).
    """
    loss = itm_loss.mean()
    if ot_loss is None or itm_ot_lambda == 0:
        return loss
    ot_pos, ot_neg = ot_loss
    n = ot_pos.numel() + ot_neg.numel()
    if n == 0:
        return loss
    ot = (ot_pos.float().sum() - ot_neg.float().sum()) / n
    return loss + itm_ot_lambda * ot.to(loss.dtype)


def masked_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices [n] of the set entries of ``mask`` (bool or uint8), row-major: what
    ``hidden[mask]`` selects, as one index that every tensor of the batch shares (under
    torch.compile one data-dependent size for all of them)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def masked_text_rows(txt_labels: torch.Tensor, joint_len: int):
    """The MLM positions (``txt_labels != -1``) as rows of the joint sequence flattened to
    [B * joint_len] (text comes first in it) and their labels: ``(rows [n], labels [n])``."""
    masked = (txt_labels != -1).nonzero()                   # [n, 2]: (example, position)
    return masked[:, 0] * joint_len + masked[:, 1], txt_labels[masked[:, 0], masked[:, 1]]


def check_rows(pred: torch.Tensor, targets: torch.Tensor, message) -> None:
    """``pred`` (one row per masked region) must have ``targets``' shape: a ValueError
    naming both in eager mode; under torch.compile, where the number of masked regions
    is data-dependent, the same condition as a check in the graph (the batch check,
    run before the compiled region, already compared the counts)."""
    if torch.compiler.is_compiling():
        torch._check(pred.size(0) == targets.size(0),
                     lambda: "the masked regions of img_mask_tgt and the target rows differ")
        return
    if pred.shape != targets.shape:
        raise ValueError(message())


class UniterForPretraining(UniterPreTrainedModel):
    """UNITER pretraining: ``forward(batch, task, compute_loss=True)`` as in the original.

    ``validate_inputs`` (default True) checks every batch (shapes, ranges, finite
    features and targets: one host sync) and raises ``ValueError`` naming the problem;
    set it False on a trusted pipeline.  Under ``torch.compile`` the forward skips the
    checks (they read tensors on the host): :meth:`validate` runs them before the
    compiled region (:func:`uniter_fast.compile_model` does, once per batch).
    """

    validate_inputs = True

    def __init__(self, config, img_dim: int, img_label_dim: int):
        super().__init__(config)
        if not isinstance(img_label_dim, int) or img_label_dim < 2:
            raise ValueError(f"img_label_dim must be an int >= 2, got {img_label_dim!r}")
        self.uniter = UniterModel(config, img_dim)
        self.cls = BertOnlyMLMHead(config, self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(
            config.hidden_size, img_dim, self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config.hidden_size, img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_weights)

    # ------------------------------------------------------------------ checks
    def check_batch(self, batch: Dict[str, Any], task: str) -> None:
        """Raise ValueError naming the problem for a malformed batch."""
        if task not in TASKS and task != "mrckl":
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        need = {"mlm": ["txt_labels"], "mrfr": ["img_masks", "img_mask_tgt", "feat_targets"],
                "itm": ["targets"]}.get(task, [])
        if task.startswith("mrc"):
            need += ["img_masks", "img_mask_tgt", "label_targets"]
        check_encoder_batch(self.uniter, batch, need, what=f"batch for task {task!r}")
        self._check_task_tensors(batch, task, need)

    def _check_task_tensors(self, batch: Dict[str, Any], task: str, need) -> None:
        """Shapes of the task's tensors against the batch (no broadcasting), finite
        targets, labels in range, complete ``ot_inputs`` -- one host sync."""
        ids, attn, feat = batch["input_ids"], batch["attn_masks"], batch["img_feat"]
        b, tl, nbb, jl = ids.size(0), ids.size(1), feat.size(1), attn.size(1)
        shapes = {"txt_labels": (b, tl), "img_masks": (b, nbb), "img_mask_tgt": (b, jl),
                  "targets": (b,)}
        widths = {"feat_targets": self.uniter.img_dim,
                  "label_targets": self.region_classifier.net[-1].out_features}
        for k in need:
            t = batch[k]
            if not torch.is_tensor(t):
                raise ValueError(f"batch for task {task!r}: {k} must be a tensor, got "
                                 f"{type(t).__name__}")
            if k in shapes and tuple(t.shape) != shapes[k]:
                raise ValueError(f"batch for task {task!r}: {k} must have shape {shapes[k]} "
                                 f"(batch {b}, text {tl}, regions {nbb}, joint {jl}), got "
                                 f"{tuple(t.shape)}")
            if k in widths and (t.dim() != 2 or t.size(1) != widths[k]):
                raise ValueError(f"batch for task {task!r}: {k} must be [masked regions, "
                                 f"{widths[k]}], got {tuple(t.shape)}")
        ot = batch.get("ot_inputs") if task == "itm" else None
        if ot is not None:
            want = {"ot_scatter": (b, jl), "scatter_max": None, "txt_pad": (b, tl),
                    "img_pad": (b, nbb)}
            miss = [k for k in want if not isinstance(ot, dict) or ot.get(k) is None]
            if miss:
                raise ValueError(f"batch for task 'itm': ot_inputs is missing {miss} (expected "
                                 f"a dict with {sorted(want)}, as the itm collate makes)")
            for k, shape in want.items():
                if shape is not None and tuple(ot[k].shape) != shape:
                    raise ValueError(f"batch for task 'itm': ot_inputs[{k!r}] must have shape "
                                     f"{shape}, got {tuple(ot[k].shape)}")
        checks = []
        for k in ("feat_targets", "label_targets"):
            if k in need and batch[k].is_floating_point():
                checks.append((f"{k} contains NaN or inf", ~torch.isfinite(batch[k]).all()))
        if "txt_labels" in need and batch["txt_labels"].numel():
            lab, v = batch["txt_labels"], self.uniter.embeddings.word_embeddings.num_embeddings
            checks.append((f"txt_labels out of range: -1 (not masked) or [0, {v})",
                           (lab < -1).any() | (lab >= v).any()))
        if "targets" in need and batch["targets"].numel():
            tg = batch["targets"]
            checks.append(("targets must be 0 or 1 (itm)", ((tg < 0) | (tg > 1)).any()))
        # the masked regions (the rows the head predicts) against the target rows
        rows = [k for k in ("feat_targets", "label_targets") if k in need]
        if not checks and not rows:
            return
        n_masked = [batch["img_mask_tgt"].bool().sum()] if rows else []
        flags = torch.stack([f.to(ids.device, torch.int64) for _, f in checks]
                            + [n.to(ids.device) for n in n_masked]).tolist()
        for (msg, _), bad in zip(checks, flags):
            if bad:
                raise ValueError(f"batch for task {task!r}: {msg}")
        for k in rows:
            n, t = flags[-1], batch[k]
            if t.size(0) != n:
                raise ValueError(
                    f"feat_targets shape {tuple(t.shape)} does not match the {n} masked "
                    f"regions in img_mask_tgt" if k == "feat_targets" else
                    f"label_targets shape {tuple(t.shape)} does not match predictions "
                    f"{(n, widths[k])}")

    def validate(self, batch: Dict[str, Any], task: str, compute_loss: bool = True) -> None:
        """The checks ``forward(batch, task, compute_loss)`` makes (when ``validate_inputs``),
        eagerly: what a compiled forward leaves to its caller."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        task = "mrc-kl" if task == "mrckl" else task
        if self.validate_inputs:
            self.check_batch(batch, task)
        elif task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    # ----------------------------------------------------------------- forward
    def forward(self, batch: Dict[str, Any], task: str, compute_loss: bool = True):
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        if task == "mrckl":
            task = "mrc-kl"
        if self.validate_inputs and not torch.compiler.is_compiling():
            self.check_batch(batch, task)
        elif task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        args = (batch["input_ids"], batch["position_ids"], batch["img_feat"],
                batch["img_pos_feat"], batch["attn_masks"], batch["gather_index"])
        if task == "mlm":
            return self.forward_mlm(*args, batch["txt_labels"], compute_loss)
        if task == "mrfr":
            return self.forward_mrfr(*args, batch["img_masks"], batch["img_mask_tgt"],
                                     batch["feat_targets"], compute_loss)
        if task == "itm":
            return self.forward_itm(*args, batch["targets"], batch.get("ot_inputs"), compute_loss)
        return self.forward_mrc(*args, batch["img_masks"], batch["img_mask_tgt"],
                                batch["label_targets"], task, compute_loss)

    @staticmethod
    def _compute_masked_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows of ``hidden`` where ``mask`` is set (bool or uint8)."""
        return select_rows(hidden, masked_index(mask))

    def forward_mlm(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                    gather_index, txt_labels, compute_loss=True):
        # the heads read only the masked positions: the encoder's last layer computes
        # only those rows (UniterEncoder.prune_last_layer)
        rows, labels = masked_text_rows(txt_labels, attention_mask.size(1))
        hidden = self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                             gather_index, output_all_encoded_layers=False, output_rows=rows)
        return self._mlm_output(hidden, labels, compute_loss)

    def _mlm_output(self, hidden, labels, compute_loss):
        """MLM scores (or per-token losses) of the masked text rows ``hidden`` [n, H]
        against their ``labels`` [n]."""
        scores = self.cls(hidden)
        if compute_loss:
            return F.cross_entropy(scores.float(), labels, reduction="none")
        return scores

    def forward_mrfr(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                     gather_index, img_masks, img_mask_tgt, feat_targets, compute_loss=True):
        hidden = self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                             gather_index, output_all_encoded_layers=False, img_masks=img_masks,
                             output_rows=masked_index(img_mask_tgt))
        pred = self.feat_regress(hidden)
        if compute_loss:
            check_rows(pred, feat_targets, lambda: (
                f"feat_targets shape {tuple(feat_targets.shape)} does not match the "
                f"{pred.size(0)} masked regions in img_mask_tgt"))
            return F.mse_loss(pred.float(), feat_targets.float(), reduction="none")
        return pred

    def forward_itm(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                    gather_index, targets, ot_inputs, compute_loss=True):
        if ot_inputs is None:   # only [CLS] is read: the last layer computes only those rows
            cls = self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                              gather_index, output_all_encoded_layers=False,
                              output_rows=first_rows(attention_mask))
            seq = cls.unsqueeze(1)
        else:                   # WRA reads every position
            seq = self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                              gather_index, output_all_encoded_layers=False)
        itm_scores = self.itm_output(self.uniter.pooler(seq))
        ot_loss = None
        if ot_inputs is not None:
            ot_dist = self._ot_distance(seq, input_ids.size(1), img_feat.size(1), ot_inputs)
            # (index_select: masked_select's values; its backward keeps the batch size symbolic
            # under torch.compile, masked_select's specialises it)
            ot_loss = (ot_dist.index_select(0, masked_index(targets == 1)),
                       ot_dist.index_select(0, masked_index(targets == 0)))
        if compute_loss:
            return F.cross_entropy(itm_scores.float(), targets, reduction="none"), ot_loss
        return itm_scores, ot_loss

    def _ot_distance(self, seq, tl: int, il: int, ot_inputs) -> torch.Tensor:
        """Scatter the compact sequence back to [text | image] slots; WRA in float32."""
        scatter_max = ot_inputs["scatter_max"]
        scatter_max = int(scatter_max.max()) if torch.is_tensor(scatter_max) else int(scatter_max)
        b, _, h = seq.shape
        max_l = torch.sym_max(scatter_max + 1, tl + il)   # (under compile: no guard on which)
        index = ot_inputs["ot_scatter"].long().unsqueeze(-1).expand_as(seq)
        ctx = seq.new_zeros(b, max_l, h).scatter(1, index, seq)
        return ops.optimal_transport_dist(ctx[:, :tl].float(), ctx[:, tl:tl + il].float(),
                                          ot_inputs["txt_pad"], ot_inputs["img_pad"])

    def forward_mrc(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                    gather_index, img_masks, img_mask_tgt, label_targets, task, compute_loss=True):
        hidden = self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                             gather_index, output_all_encoded_layers=False, img_masks=img_masks,
                             output_rows=masked_index(img_mask_tgt))
        pred = self.region_classifier(hidden)
        if not compute_loss:
            return pred
        check_rows(pred, label_targets, lambda: (
            f"label_targets shape {tuple(label_targets.shape)} does not match "
            f"predictions {tuple(pred.shape)}"))
        if "kl" in task:
            return F.kl_div(F.log_softmax(pred.float(), dim=-1), label_targets.float(),
                            reduction="none")
        # background (class 0) is never the target
        hard = label_targets[:, 1:].argmax(dim=-1) + 1
        return F.cross_entropy(pred.float(), hard, ignore_index=0, reduction="none")
