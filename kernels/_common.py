"""Helpers shared by the Triton kernel files.

The Triton interpreter (``TRITON_INTERPRET=1``, how the CPU test suite runs
the kernels) differs from compiled code in three ways the kernels work
around, always the same way:

* a loop bound must be a Python int there, not a runtime kernel argument:
  every loop over a runtime length ``n`` is written
  ``range(0, N_I if N_I > 0 else n, step)`` with a constexpr ``N_I`` that the
  launcher sets to :func:`interp_bound` (``n`` when interpreting, else 0, so
  compiled code has one variant for every length);
* its fp32 → bf16 cast truncates (the GPU rounds to nearest even):
  :func:`round_bf16_rtne`;
* its bf16 ``tl.dot`` is wrong: bf16 operands are rounded to bf16 and kept
  in fp32 (``UPCAST``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "interp_bound", "check_launchable", "pow2", "round_bf16_rtne"]


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interp_bound(n: int) -> int:
    """Value of a loop-bound constexpr: ``n`` in the interpreter, 0 (= use the
    runtime argument) in compiled code."""
    return int(n) if interpreting() else 0


def check_launchable(kernel: str, device: torch.device) -> None:
    """What every launcher relies on: CUDA tensors, or CPU under the interpreter."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{kernel} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                         f"got {device}")


def pow2(x: int, lo: int = 16) -> int:
    """Next power of two ≥ max(x, 1), at least ``lo`` (tile sizes)."""
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


@triton.jit
def round_bf16_rtne(x):
    """fp32 → nearest bf16 value (ties to even), kept in fp32.  Used only in
    the interpreter, whose fp32→bf16 cast truncates (the GPU cast rounds)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
