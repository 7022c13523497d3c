"""The code standard, checked: ruff's pyflakes (F) and import (I) rules as configured
in pyproject.toml, over everything we write."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_clean():
    pytest.importorskip("ruff", reason="ruff is in requirements.txt (pip install ruff)")
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
