"""WRA distance, drop-in for UNITER's ``model/ot.py`` (dispatches to the fastest IPOT backend)."""
from ..ops import ipot, optimal_transport_dist
from ..reference.ot import cost_matrix_cosine

__all__ = ["optimal_transport_dist", "ipot", "cost_matrix_cosine"]
