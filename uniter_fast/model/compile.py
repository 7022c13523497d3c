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

Token-bucket batches vary every dimension (examples, text length, regions, joint length,
masked positions), so every dimension is symbolic from the first compilation
(``dynamic=True``) and dimensions that happen to be equal do not share a symbol
(:data:`SHAPE_CONFIG`): a forward compiles once per task, train/eval mode and grad mode
(and, on CPU, once more on the other side of the padded length from which "auto"
attention switches to SDPA), whatever the lengths; ``recompile_limit`` is raised so that
these never fall back to eager.  (Automatic dynamic shapes, ``dynamic=None``, compiled
each task two to four times over the default run, once per newly varying dimension.)

``compile_model(model)`` compiles ``model.forward`` in place: the module, its parameters
and its state-dict keys stay as they are (``torch.compile(model)`` would add an
``_orig_mod.`` prefix to every key), so DeepSpeed, checkpoints and export see the same
model.  Compilation happens on the first call of each kind.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["compile_model", "is_compiled", "compiling", "DYNAMO_CONFIG", "dynamo_config",
           "SHAPE_CONFIG", "compile_counts", "COMPILE_DEFAULT", "use_compile",
           "add_compile_arguments"]

#: whether ``train.py`` / ``finetune.py`` / ``infer`` / ``predict`` compile the model when the command
#: line says neither ``--compile`` nor ``--no-compile``, per device type: on only where
#: the compiled default run was measured faster than the eager one (README,
#: "torch.compile"); a device type not listed (a GPU: not measured yet) runs eagerly
COMPILE_DEFAULT: Dict[str, bool] = {"cpu": False}


def add_compile_arguments(parser) -> None:
    """``--compile`` / ``--no-compile`` and ``--compile_backend``, as every command takes them
    (``parser``: an argparse parser or argument group); :func:`use_compile` reads the flag."""
    import argparse
    parser.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                        help="torch.compile the model's forward (uniter_fast.compile_model, at "
                             "its first batch; batch checks before the compiled region); "
                             "default: on where it was measured faster (uniter_fast.model."
                             "compile.COMPILE_DEFAULT: no device so far), off elsewhere")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend with --compile (inductor; aot_eager traces "
                             "the same graphs without code generation)")


def use_compile(flag: Optional[bool], device: torch.device) -> bool:
    """``--compile`` / ``--no-compile`` (True / False), else :data:`COMPILE_DEFAULT`."""
    return bool(COMPILE_DEFAULT.get(device.type, False) if flag is None else flag)

#: dynamo settings of a compiled UNITER forward (see the module docstring)
DYNAMO_CONFIG: Dict[str, Any] = {
    "capture_dynamic_output_shape_ops": True,
    "capture_scalar_outputs": True,
    "recompile_limit": 64,
}


#: symbolic-shape settings: no duck shaping (two dimensions that happen to be equal in the
#: first batch, e.g. the text length and the region-label width, would share one symbol,
#: and a guard on one would then specialise the other)
SHAPE_CONFIG: Dict[str, Any] = {"use_duck_shape": False}


@contextlib.contextmanager
def dynamo_config() -> Iterator[None]:
    """A context manager with :data:`DYNAMO_CONFIG` and :data:`SHAPE_CONFIG` set (e.g. for
    ``torch._dynamo.explain`` or a ``torch.compile`` of your own around a UNITER model)."""
    import torch.fx.experimental._config as shape_config
    with torch._dynamo.config.patch(**DYNAMO_CONFIG), shape_config.patch(**SHAPE_CONFIG):
        yield


def _validate_hook(module: nn.Module, args, kwargs) -> None:
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(*args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_model` compiled ``model``'s forward."""
    return getattr(model, "_uniter_compiled", None) is not None


def compile_model(model: nn.Module, *, backend: str = "inductor", dynamic: Optional[bool] = True,
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


#: compile_model's arguments of the active :func:`compiling` contexts (innermost last)
_COMPILING: List[Dict[str, Any]] = []


@contextlib.contextmanager
def compiling(**kwargs) -> Iterator[None]:
    """Every UNITER model built inside compiles itself (``compile_model(model, **kwargs)``)
    at its first call as the outermost model (from that call on); a model built inside
    another (the encoder of a task model) is compiled as part of it.  For commands whose
    models are built by the task code (``python -m uniter_fast.infer --compile``)."""
    _COMPILING.append(dict(kwargs))
    try:
        yield
    finally:
        _COMPILING.pop()


def register_lazy_compile(model: nn.Module) -> None:
    """Called by every UNITER model's constructor: inside :func:`compiling`, give the model
    a forward that compiles it at the first call (see there)."""
    if not _COMPILING:
        return
    kwargs = _COMPILING[-1]

    def first_call(*args, **kw):
        for m in model.modules():      # the submodules are compiled as part of this one
            if getattr(m.__dict__.get("forward"), "_uniter_lazy", False):
                del m.__dict__["forward"]
        if torch.compiler.is_compiling():
            return model.forward(*args, **kw)
        compile_model(model, **kwargs)
        _validate_hook(model, args, kw)      # (the pre-hook runs from the next call on)
        return model.forward(*args, **kw)

    first_call._uniter_lazy = True
    model.forward = first_call


def compile_counts() -> Dict[str, int]:
    """Dynamo's process-wide counts so far: ``compilations`` (frames compiled: every
    first compilation and every recompilation), ``graphs`` (graphs captured) and
    ``graph_breaks`` (breaks met while compiling)."""
    c = torch._dynamo.utils.counters
    return {"compilations": int(c["frames"].get("ok", 0)),
            "graphs": int(c["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(c["graph_break"].values())
                                + sum(c["unimplemented"].values()))}
