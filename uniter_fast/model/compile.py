"""``torch.compile`` for UNITER models: :func:`compile_model`.

Every op of :mod:`uniter_fast.ops` is a registered custom op or plain PyTorch that dynamo
traces, and no model's forward reads a tensor on the host under ``torch.compile``, so a
forward compiles into one graph (and its backward into one graph).  Three settings make
that so, and :func:`compile_model` applies them around each compiled call:

* the batch checks read tensors on the host (one sync per batch): a forward skips them
  while it is being compiled, and :func:`compile_model` runs them eagerly before each
  compiled call (``model.validate(*args, **kwargs)``, a forward pre-hook), with the same
  errors as the eager forward;
* the pretraining heads select the masked positions (MLM tokens, masked regions, ITM's
  positive and negative pairs): a data-dependent number of rows, which dynamo captures
  with ``capture_dynamic_output_shape_ops`` (the losses keep their shapes and values);
* the Triton attention draws its dropout seed with ``Tensor.item()`` on the CPU
  generator (GPU, training): ``capture_scalar_outputs`` keeps it in the graph.

A forward is compiled per task, train/eval mode and grad mode (and, on CPU, on each side
of the padded length from which "auto" attention switches to SDPA): ``recompile_limit``
is raised so that these do not fall back to eager.  Token-bucket batches of varying
length recompile once per task (the first change of a length marks it dynamic); padding
the lengths up to a multiple (:func:`round_up`, what ``--compile`` does in the
collate) keeps the number of distinct shapes small either way.

``compile_model(model)`` compiles ``model.forward`` in place: the module, its parameters
and its state-dict keys stay as they are (``torch.compile(model)`` would add an
``_orig_mod.`` prefix to every key), so DeepSpeed, checkpoints and export see the same
model.  Compilation happens on the first call of each kind.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["compile_model", "is_compiled", "DYNAMO_CONFIG", "dynamo_config", "round_up",
           "compile_counts"]

#: dynamo settings of a compiled UNITER forward (see the module docstring)
DYNAMO_CONFIG: Dict[str, Any] = {
    "capture_dynamic_output_shape_ops": True,
    "capture_scalar_outputs": True,
    "recompile_limit": 64,
}


def dynamo_config():
    """A context manager with :data:`DYNAMO_CONFIG` set (e.g. for ``torch._dynamo.explain``
    or a ``torch.compile`` of your own around a UNITER model)."""
    return torch._dynamo.config.patch(**DYNAMO_CONFIG)


def _validate_hook(module: nn.Module, args, kwargs) -> None:
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(*args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_model` compiled ``model``'s forward."""
    return getattr(model, "_uniter_compiled", None) is not None


def compile_model(model: nn.Module, *, backend: str = "inductor", dynamic: Optional[bool] = None,
                  mode: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                  fullgraph: bool = False) -> nn.Module:
    """Compile ``model``'s forward in place with ``torch.compile`` (the other arguments are
    ``torch.compile``'s) and return ``model``.

    The batch checks of the forward run eagerly before each compiled call (a forward
    pre-hook calling ``model.validate``), the compiled call runs under
    :data:`DYNAMO_CONFIG`.  State-dict keys, parameters and the module itself are
    unchanged.  Calling it again on a compiled model does nothing.
    """
    if is_compiled(model):
        return model
    compiled = torch.compile(model.forward, backend=backend, dynamic=dynamic, mode=mode,
                             options=options, fullgraph=fullgraph)

    def forward(*args, **kwargs):
        with dynamo_config():
            return compiled(*args, **kwargs)

    forward.__doc__ = type(model).forward.__doc__
    model.forward = forward
    model._uniter_compiled = compiled
    model.register_forward_pre_hook(_validate_hook, with_kwargs=True)
    return model


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (1: unchanged)."""
    return -(-int(n) // multiple) * multiple if multiple > 1 else int(n)


def compile_counts() -> Dict[str, int]:
    """Dynamo's process-wide counts so far: ``compilations`` (frames compiled: every
    first compilation and every recompilation), ``graphs`` (graphs captured) and
    ``graph_breaks`` (breaks met while compiling)."""
    c = torch._dynamo.utils.counters
    return {"compilations": int(c["frames"].get("ok", 0)),
            "graphs": int(c["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(c["graph_break"].values())
                                + sum(c["unimplemented"].values()))}
