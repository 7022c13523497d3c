"""keep_freed_memory (uniter_fast/training/allocator.py): after it, a freed 96 MiB block is
reused without page faults; without it (glibc's defaults, or the opt-out variable) every
new block is faulted in again.  Each case in its own process (the setting is for the
process's life)."""
import json
import os
import subprocess
import sys

import pytest

from uniter_fast.training.allocator import KEEP_FREED_MEMORY_ENV, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

PROBE = r"""
import json, resource, sys
import torch
from uniter_fast.training.allocator import allocator_state, keep_freed_memory
on = keep_freed_memory(None if sys.argv[1] == "env" else sys.argv[1] == "on")
n = 24 * 2 ** 20                      # 96 MiB of float32: over glibc's 32 MiB mmap ceiling
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(n)                 # touches every page
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
print(json.dumps({"on": on, "state": allocator_state(), "faults": faults}))
"""


def _probe(mode, env_value=None):
    env = dict(os.environ)
    env.pop(KEEP_FREED_MEMORY_ENV, None)
    if env_value is not None:
        env[KEEP_FREED_MEMORY_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults():
    pages = 24 * 2 ** 20 * 4 // os.sysconf("SC_PAGE_SIZE")
    kept = _probe("on")
    assert kept["on"] is True and kept["state"] == "kept"
    # the first blocks are faulted in; once the heap holds them, later ones reuse them
    assert kept["faults"][0] > pages // 2
    assert max(kept["faults"][-2:]) < pages // 20, kept
    default = _probe("off")
    assert default["on"] is False and default["state"] == "default"
    assert min(default["faults"][1:]) > pages // 2, default


@pytest.mark.parametrize("value, on", [("0", False), ("no", False), ("1", True)])
def test_the_environment_variable(value, on):
    got = _probe("env", value)
    assert got["on"] is on and got["state"] == ("kept" if on else "default")
    assert (max(got["faults"][-2:]) < 24 * 2 ** 20 * 4 // os.sysconf("SC_PAGE_SIZE") // 20) is on
