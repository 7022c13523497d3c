"""The op layer: one public function per op, each with a ``backend=`` keyword.

The model calls only these functions.  ``use_backend(name)`` switches every
op at once (``"reference"`` runs the whole model on the plain-PyTorch twins);
``available_backends(op)`` lists what this machine can run, fastest first;
``unavailable_reason(op, backend, ...)`` says why one cannot run (given the
call's tensors, also for that shape); ``selected_backend(op, ...)`` names
what a call runs on.
"""
from ._registry import (
                        BackendUnavailableError,
                        available_backends,
                        current_backend,
                        registered_backends,
                        selected_backend,
                        unavailable_reason,
                        use_backend,
)
from .attention import attention
from .cost import cost_matrix_cosine
from .ipot import ipot, ipot_distance
from .layer_norm import gelu, layer_norm
from .nms import batched_nms, nms
from .roi_pool import roi_pool
from .wra import optimal_transport_dist

__all__ = ["attention", "ipot", "ipot_distance", "optimal_transport_dist", "cost_matrix_cosine",
           "layer_norm", "gelu", "nms", "batched_nms", "roi_pool", "use_backend",
           "available_backends", "registered_backends", "current_backend", "unavailable_reason",
           "selected_backend",
           "BackendUnavailableError"]
