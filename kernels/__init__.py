"""Triton kernels for uniter_fast (importable as ``uniter_fast.kernels``).

One kernel per file: the ``@triton.jit`` code, its launcher and its
``autograd.Function`` together.  Nothing here is imported by
``import uniter_fast``; :mod:`uniter_fast.ops` loads a kernel on first use.
"""
