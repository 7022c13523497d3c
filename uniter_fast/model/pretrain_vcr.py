"""Second-stage (in-domain) pretraining of UNITER on VCR, drop-in for the original's
``model/pretrain_vcr.py``.

``UniterForPretrainingForVCR(config, img_dim, img_label_dim)`` is
:class:`~uniter_fast.model.pretrain.UniterForPretraining` (same submodules and keys) with
VCR's :meth:`init_type_embedding` (4 token types) and :meth:`init_word_embedding` (the 81
person tags; the MLM head is rebuilt on the grown embedding, as in the original, so its
transform starts afresh), and ``forward(batch, task, compute_loss=True)`` for ``mlm``,
``mrfr``, ``mrc`` and ``mrc-kl`` (``mrckl``) passing ``batch['txt_type_ids']`` to the
encoder.  The losses are per element (``reduction='none'``), as in pretraining; the
original ``pretrain_vcr.py`` reduces them with ``loss.mean()``.  Its checkpoint (the
released ``uniter-base-vcr_2nd_stage.pt``) is the usual starting point of VCR fine-tuning:
the encoder keys match :class:`~uniter_fast.model.vcr.UniterForVisualCommonsenseReasoning`
after its ``init_*`` calls.
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F

from .layer import BertOnlyMLMHead
from .pretrain import UniterForPretraining, check_rows, masked_index, masked_text_rows
from .vcr import VCR_TYPE_ROWS, grow_type_embedding, grow_word_embedding

__all__ = ["UniterForPretrainingForVCR", "VCR_PRETRAIN_TASKS"]

VCR_PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrc-kl")


class UniterForPretrainingForVCR(UniterForPretraining):
    """2nd-stage pretraining of UNITER for VCR (MLM, MRFR, MRC, MRC-KL with token types)."""

    def init_type_embedding(self) -> None:
        grow_type_embedding(self, VCR_TYPE_ROWS)

    def init_word_embedding(self, num_special_tokens: int) -> None:
        emb = grow_word_embedding(self, num_special_tokens)
        cls = BertOnlyMLMHead(self.uniter.config, emb.weight)
        self.cls = cls.to(device=emb.weight.device, dtype=emb.weight.dtype)

    def validate(self, batch: Dict[str, Any], task: str, compute_loss: bool = True) -> None:
        """The checks of :meth:`forward`, eagerly (what a compiled forward leaves out)."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        task = "mrc-kl" if task == "mrckl" else task
        if task not in VCR_PRETRAIN_TASKS:
            raise ValueError(f"invalid task {task!r} for VCR pretraining; expected one of "
                             f"{VCR_PRETRAIN_TASKS}")
        if self.validate_inputs:
            self.check_batch(batch, task)

    def forward(self, batch: Dict[str, Any], task: str, compute_loss: bool = True):
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        task = "mrc-kl" if task == "mrckl" else task
        if task not in VCR_PRETRAIN_TASKS:
            raise ValueError(f"invalid task {task!r} for VCR pretraining; expected one of "
                             f"{VCR_PRETRAIN_TASKS}")
        if self.validate_inputs and not torch.compiler.is_compiling():
            self.check_batch(batch, task)
        args = (batch["input_ids"], batch["position_ids"], batch.get("txt_type_ids"),
                batch["img_feat"], batch["img_pos_feat"], batch["attn_masks"],
                batch["gather_index"])
        if task == "mlm":
            return self.forward_mlm(*args, batch["txt_labels"], compute_loss)
        if task == "mrfr":
            return self.forward_mrfr(*args, batch["img_masks"], batch["img_mask_tgt"],
                                     batch["feat_targets"], compute_loss)
        return self.forward_mrc(*args, batch["img_masks"], batch["img_mask_tgt"],
                                batch["label_targets"], task, compute_loss)

    def _encode(self, input_ids, position_ids, txt_type_ids, img_feat, img_pos_feat,
                attention_mask, gather_index, img_masks=None, output_rows=None) -> torch.Tensor:
        """The last layer's rows ``output_rows`` [n, H] (the ones the head reads)."""
        return self.uniter(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                           gather_index, output_all_encoded_layers=False, img_masks=img_masks,
                           txt_type_ids=txt_type_ids, output_rows=output_rows)

    def forward_mlm(self, input_ids, position_ids, txt_type_ids, img_feat, img_pos_feat,
                    attention_mask, gather_index, txt_labels, compute_loss=True):
        rows, labels = masked_text_rows(txt_labels, attention_mask.size(1))
        hidden = self._encode(input_ids, position_ids, txt_type_ids, img_feat, img_pos_feat,
                              attention_mask, gather_index, output_rows=rows)
        return self._mlm_output(hidden, labels, compute_loss)

    def forward_mrfr(self, input_ids, position_ids, txt_type_ids, img_feat, img_pos_feat,
                     attention_mask, gather_index, img_masks, img_mask_tgt, feat_targets,
                     compute_loss=True):
        pred = self.feat_regress(self._encode(input_ids, position_ids, txt_type_ids, img_feat,
                                        img_pos_feat, attention_mask, gather_index, img_masks,
                                        output_rows=masked_index(img_mask_tgt)))
        if compute_loss:
            check_rows(pred, feat_targets, lambda: (
                f"feat_targets shape {tuple(feat_targets.shape)} does not match the "
                f"{pred.size(0)} masked regions in img_mask_tgt"))
            return F.mse_loss(pred.float(), feat_targets.float(), reduction="none")
        return pred

    def forward_mrc(self, input_ids, position_ids, txt_type_ids, img_feat, img_pos_feat,
                    attention_mask, gather_index, img_masks, img_mask_tgt, label_targets,
                    task, compute_loss=True):
        pred = self.region_classifier(self._encode(input_ids, position_ids, txt_type_ids, img_feat,
                                        img_pos_feat, attention_mask, gather_index, img_masks,
                                        output_rows=masked_index(img_mask_tgt)))
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
