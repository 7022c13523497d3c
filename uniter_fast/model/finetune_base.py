"""What the fine-tuning models (VQA, VE, NLVR2) share: batch validation and the encoder call.

Not in the original (its task classes derive from ``UniterPreTrainedModel``
directly); this base adds no parameters or submodules, so state dicts are
unchanged.  Subclasses build ``self.uniter`` (a :class:`UniterModel`) first, then
their heads, then ``self.apply(self.init_weights)``, as the original does.
"""
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .model import UniterModel, UniterPreTrainedModel, check_encoder_batch, first_rows

__all__ = ["UniterFinetuneModel", "init_type_embedding", "check_class_targets",
           "check_soft_targets"]


class UniterFinetuneModel(UniterPreTrainedModel):
    """Base of the task models: ``forward(batch, compute_loss=True)``.

    ``validate_inputs`` (default True) checks every batch (shapes, ranges,
    finite features and targets; one or two host syncs) and raises
    ``ValueError`` naming the problem; set it False on a trusted pipeline.
    Under ``torch.compile`` the forward skips the checks (they read tensors on the
    host): :meth:`validate` runs them before the compiled region
    (:func:`uniter_fast.compile_model` does, once per batch).
    """

    validate_inputs = True
    #: whether the encoder call passes ``batch["img_type_ids"]`` (NLVR2) or not (VQA/VE)
    uses_img_type_ids = False
    #: whether it passes ``batch["txt_type_ids"]`` (VCR) or not
    uses_txt_type_ids = False

    uniter: UniterModel

    def check_batch(self, batch: Dict[str, Any], compute_loss: bool = True) -> None:
        need = ["targets"] if compute_loss else []
        check_encoder_batch(self.uniter, batch, need, what=f"{type(self).__name__} batch")
        self._check_layout(batch)
        if compute_loss:
            self._check_targets(batch)

    def validate(self, batch: Dict[str, Any], compute_loss: bool = True) -> None:
        """The checks ``forward(batch, compute_loss)`` makes (when ``validate_inputs``),
        eagerly: what a compiled forward leaves to its caller."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        if self.validate_inputs:
            self.check_batch(batch, compute_loss)

    def _check_layout(self, batch: Dict[str, Any]) -> None:
        """Task-specific structure checks (no host sync)."""

    def _check_targets(self, batch: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _checked(self, batch: Dict[str, Any], compute_loss: bool) -> None:
        """The batch checks (if enabled; not under torch.compile, see :meth:`validate`)."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        if self.validate_inputs and not torch.compiler.is_compiling():
            self.check_batch(batch, compute_loss)

    def _run_encoder(self, batch: Dict[str, Any],
                     output_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.uniter(batch["input_ids"], batch["position_ids"], batch["img_feat"],
                           batch["img_pos_feat"], batch["attn_masks"], batch["gather_index"],
                           output_all_encoded_layers=False,
                           img_type_ids=batch.get("img_type_ids") if self.uses_img_type_ids
                           else None,
                           txt_type_ids=batch.get("txt_type_ids") if self.uses_txt_type_ids
                           else None, output_rows=output_rows)

    def _encode(self, batch: Dict[str, Any], compute_loss: bool) -> torch.Tensor:
        """Validate (if enabled) and run the encoder; returns the last layer [B, T, H]."""
        self._checked(batch, compute_loss)
        return self._run_encoder(batch)

    def _pooled(self, batch: Dict[str, Any], compute_loss: bool) -> torch.Tensor:
        """Validate (if enabled) and encode: the pooled [CLS] output [B, H].  The encoder's
        last layer computes only the [CLS] rows (``UniterEncoder.prune_last_layer``)."""
        self._checked(batch, compute_loss)
        cls = self._run_encoder(batch, first_rows(batch["attn_masks"]))
        return self.uniter.pooler(cls.unsqueeze(1))


def check_class_targets(name: str, targets: torch.Tensor, n: int, n_classes: int) -> None:
    """``targets`` must be an integer tensor [n] with values in [0, n_classes)."""
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() != 1:
        raise ValueError(f"{name}: targets must be an integer class tensor [{n}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if targets.size(0) != n:
        raise ValueError(f"{name}: targets has {targets.size(0)} entries, expected {n}")
    if n and bool((targets.min() < 0) | (targets.max() >= n_classes)):
        raise ValueError(f"{name}: targets out of range [0, {n_classes})")


def check_soft_targets(name: str, targets: torch.Tensor, shape: Sequence[int]) -> None:
    """``targets`` must be a float tensor of ``shape`` with finite values in [0, 1]."""
    if not targets.dtype.is_floating_point or tuple(targets.shape) != tuple(shape):
        raise ValueError(f"{name}: targets must be a float tensor {tuple(shape)}, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if targets.numel() and not bool(((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(f"{name}: targets must be finite scores in [0, 1]")


def init_type_embedding(model: UniterFinetuneModel, num_types: int = 3) -> None:
    """Grow ``model.uniter``'s token-type embedding to ``num_types`` rows, as UNITER's NLVR2
    models do: rows 0 (text) and 1 (image) keep their weights and every further row
    (row 2: the second image) starts as a copy of row 1.  On an embedding that already
    has ``num_types`` rows (a second call) every row is kept; the original would reset
    row 2 to row 1.

    A fresh ``nn.Embedding`` is built and initialised first, consuming the same random
    numbers as the original, so later random draws match it.
    """
    old = model.uniter.embeddings.token_type_embeddings
    n_old = old.num_embeddings
    if num_types < n_old:
        raise ValueError(f"init_type_embedding: the embedding already has {n_old} rows "
                         f"(asked for {num_types})")
    new = nn.Embedding(num_types, model.uniter.config.hidden_size)
    new.apply(model.init_weights)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    rows = torch.tensor([min(i, n_old - 1) for i in range(num_types)], device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight[rows])
    new.weight.requires_grad_(old.weight.requires_grad)
    model.uniter.embeddings.token_type_embeddings = new
