"""Plain-PyTorch reference implementations of every op a kernel replaces.

These are the baselines that tests and benchmarks compare against: simple,
obviously right, and never optimised.
"""
from .attention import attention
from .detection import batched_nms, box_iou, nms, roi_pool
from .layer_norm import gelu, layer_norm
from .ot import cost_matrix_cosine, ipot, ipot_distance, optimal_transport_dist

__all__ = ["attention", "ipot", "ipot_distance", "cost_matrix_cosine", "optimal_transport_dist",
           "layer_norm", "gelu", "box_iou", "nms", "batched_nms", "roi_pool"]
