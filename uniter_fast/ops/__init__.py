"""The op layer: one public function per op, each with a ``backend=`` keyword.

The model calls only these functions.  ``use_backend(name)`` switches every
op at once (``"reference"`` runs the whole model on the plain-PyTorch twins);
``available_backends(op)`` lists what this machine can run, fastest first.
"""
from ._registry import (BackendUnavailableError, available_backends, current_backend,
                        registered_backends, use_backend)
from .attention import attention
from .ipot import ipot, ipot_distance, optimal_transport_dist
from .layer_norm import gelu, layer_norm

__all__ = ["attention", "ipot", "ipot_distance", "optimal_transport_dist", "layer_norm", "gelu",
           "use_backend", "available_backends", "registered_backends", "current_backend",
           "BackendUnavailableError"]
