"""Comparing metric records (the dicts of a ``metrics.jsonl``) with a tolerance on their
numbers only.

``pytest.approx`` is for numbers and flat containers of numbers: since pytest 9.2 a mapping
with a string or None value under ``rel=`` raises TypeError ("expected value must support
abs(...)"), and a nested list or dict raises too.  A record mixes numbers with strings
(``"event": "validation"``), None, bools and nested lists, so compare it field by field.
"""
import numbers

import pytest

__all__ = ["assert_records_close"]


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def assert_records_close(actual, expected, rel=None, abs=None, _path="record"):
    """Assert ``actual`` matches ``expected``: dicts with the same keys and lists/tuples of the
    same length, compared recursively; numbers (int/float, not bool) with
    ``pytest.approx(expected, rel=rel, abs=abs, nan_ok=True)`` (pytest's defaults where None);
    everything else (str, None, bool, ...) exactly, type included (True is not 1).  The
    AssertionError names the first differing field."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{_path}: expected a dict, got {actual!r}"
        assert actual.keys() == expected.keys(), (
            f"{_path}: keys differ: missing {sorted(map(str, expected.keys() - actual.keys()))},"
            f" extra {sorted(map(str, actual.keys() - expected.keys()))}")
        for k in expected:
            assert_records_close(actual[k], expected[k], rel, abs, f"{_path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{_path}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), (
            f"{_path}: length {len(actual)} != {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_records_close(a, e, rel, abs, f"{_path}[{i}]")
    elif _is_number(expected):
        assert _is_number(actual), f"{_path}: expected a number, got {actual!r}"
        assert actual == pytest.approx(expected, rel=rel, abs=abs, nan_ok=True), (
            f"{_path}: {actual!r} != {expected!r} (rel={rel}, abs={abs})")
    else:
        assert type(actual) is type(expected) and actual == expected, (
            f"{_path}: {actual!r} != {expected!r}")
