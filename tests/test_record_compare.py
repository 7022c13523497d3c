"""record_compare.assert_records_close: numbers within tolerance, everything else exact."""
import math

import pytest
from record_compare import assert_records_close

REC = {"step": 24, "event": "validation", "val/acc": 0.5, "val/loss": 1.25, "note": None,
       "ok": True, "per_class": [0.1, 0.2, {"n": 3, "name": "x"}], "nan": math.nan}


def _copy(**kw):
    return dict(REC, **kw)


def test_equal_and_within_tolerance_pass():
    assert_records_close(_copy(), REC, rel=1e-6)
    assert_records_close(_copy(**{"val/acc": 0.5 * (1 + 5e-7)}), REC, rel=1e-6)
    assert_records_close(_copy(per_class=[0.1 + 1e-8, 0.2, {"n": 3, "name": "x"}]), REC,
                         rel=1e-6)
    assert_records_close(_copy(step=24.0), REC, rel=1e-6)     # int vs float: both numbers


@pytest.mark.parametrize("changed, field", [
    ({"val/acc": 0.5 * (1 + 2e-6)}, "'val/acc'"),            # a number out of tolerance
    ({"event": "validatio"}, "'event'"),                     # a differing string
    ({"note": 0.0}, "'note'"),                               # None is not a number
    ({"note": "None"}, "'note'"),
    ({"ok": False}, "'ok'"),
    ({"ok": 1}, "'ok'"),                                     # a bool is not 1
    ({"step": True}, "'step'"),
    ({"step": "24"}, "'step'"),
    ({"per_class": [0.1, 0.2]}, "'per_class'"),              # a shorter nested list
    ({"per_class": [0.1, 0.2, {"n": 3, "name": "y"}]}, "'name'"),   # deep in a nested dict
    ({"per_class": [0.1, 0.2, {"n": 4, "name": "x"}]}, "'n'"),
    ({"nan": 0.0}, "'nan'"),
    ({"extra": 1}, "keys differ"),                           # a key too many
])
def test_a_difference_raises_and_names_the_field(changed, field):
    with pytest.raises(AssertionError, match=field):
        assert_records_close(_copy(**changed), REC, rel=1e-6)


def test_a_missing_key_raises():
    rec = _copy()
    del rec["event"]
    with pytest.raises(AssertionError, match="missing.*event"):
        assert_records_close(rec, REC, rel=1e-6)


def test_abs_tolerance():
    assert_records_close({"x": 1e-9}, {"x": 0.0}, abs=1e-8)
    with pytest.raises(AssertionError):
        assert_records_close({"x": 1e-7}, {"x": 0.0}, abs=1e-8)
