"""uniter_fast: a fast, trustworthy UNITER.

Drop-in for the original UNITER code::

    from uniter_fast import UniterConfig, UniterForPretraining   # was: from model.pretrain import ...
    model = UniterForPretraining.from_pretrained(
        "uniter-base.json", torch.load("uniter-base.pt", weights_only=True),
        img_dim=2048, img_label_dim=1601)
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _expose_source_kernels() -> None:
    """Make top-level ``kernels/`` importable as ``uniter_fast.kernels`` when
    running from a source checkout that was not pip-installed."""
    if "uniter_fast.kernels" in _sys.modules or _ilu.find_spec("uniter_fast.kernels") is not None:
        return
    kdir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(kdir, "__init__.py")
    if _os.path.exists(init):
        spec = _ilu.spec_from_file_location("uniter_fast.kernels", init,
                                            submodule_search_locations=[kdir])
        mod = _ilu.module_from_spec(spec)
        _sys.modules["uniter_fast.kernels"] = mod
        spec.loader.exec_module(mod)
        globals()["kernels"] = mod


_expose_source_kernels()

from . import ops, reference
from .config import UniterConfig, config_path
from .model import TASKS, UniterForPretraining, UniterModel, UniterPreTrainedModel, itm_ot_loss
from .model.compile import compile_model
from .ops import optimal_transport_dist

__all__ = ["UniterConfig", "config_path", "UniterModel", "UniterPreTrainedModel",
           "UniterForPretraining", "itm_ot_loss", "optimal_transport_dist", "TASKS", "ops",
           "reference", "compile_model"]
