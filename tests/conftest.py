"""Test setup: on a machine without CUDA, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tag tests gated by ``requires_cuda`` with the ``cuda`` marker, so that
    ``pytest tests -m cuda`` selects exactly the GPU subset (used by
    benchmarks/device_check.sh); a test marked ``cuda`` directly is skipped
    without a GPU."""
    for item in items:
        if any(m == requires_cuda.mark for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
        elif item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
