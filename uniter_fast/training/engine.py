"""Parameter groups and the DeepSpeed engine."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["NO_DECAY", "param_groups", "create_engine", "full_state_dict"]

# UNITER's rule: no weight decay on biases and LayerNorm parameters
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 head_prefixes: Sequence[str] = (), lr_mul: float = 1.0,
                 base_lr: Optional[float] = None) -> List[Dict[str, Any]]:
    """UNITER's groups: decay / no decay; with ``head_prefixes`` and ``lr_mul``
    (fine-tuning) the parameters under those prefixes form their own groups whose
    learning rate is ``lr_mul`` times the base one (UNITER's ``lr_mul``).

    Each group carries ``lr_mul`` so a scheduler (or DeepSpeed's, through a
    per-group ``warmup_max_lr`` list) can scale it.
    """
    groups: Dict[tuple, List[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = any(n.startswith(h) for h in head_prefixes)
        decay = not any(nd in n for nd in NO_DECAY)
        groups.setdefault((head, decay), []).append(p)
    out = []
    for head in (False, True):
        for decay in (True, False):
            ps = groups.get((head, decay))
            if not ps:
                continue
            mul = float(lr_mul) if head else 1.0
            g = {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mul": mul}
            if base_lr is not None:
                g["lr"] = float(base_lr) * mul
            out.append(g)
    return out


def create_engine(model: torch.nn.Module, groups, ds_config: Dict[str, Any]):
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=ds_config)
    return engine


def full_state_dict(engine, zero_stage: int) -> Dict[str, torch.Tensor]:
    """This rank's full fp32 copy of the module weights (gathered under ZeRO-3)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
