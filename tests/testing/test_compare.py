"""The tolerance helper: relative-RMS criterion, NaN detection, messages that report max abs/rel errors."""

import math

import pytest
import torch

from pflow_dist.testing import assert_close, error_stats


def test_error_stats_values():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    out = torch.tensor([1.0, -2.5, 4.0], dtype=torch.float64)
    st = error_stats(ref, out)
    assert st.max_abs == pytest.approx(0.5)
    assert st.max_rel == pytest.approx(0.25)
    assert st.rms_ratio == pytest.approx(math.sqrt(0.25 / 3) / math.sqrt(21 / 3))


def test_assert_close_passes_and_fails_with_report():
    ref = torch.randn(100, dtype=torch.float64)
    assert assert_close("x", ref, ref + 1e-9, 1e-6).rms_ratio < 1e-6
    with pytest.raises(AssertionError, match=r"x: max_abs=1\.000e-01 max_rel=.* rms_ratio=.* exceeds ratio=1e-06"):
        assert_close("x", ref, ref + 0.1, 1e-6)


def test_assert_close_catches_nan_and_shape():
    ref = torch.ones(4)
    out = ref.clone()
    out[2] = float("nan")
    with pytest.raises(AssertionError, match="1 non-finite value"):
        assert_close("y", ref, out, 1.0)
    with pytest.raises(ValueError, match=r"shape mismatch: reference \(4,\) vs result \(3,\)"):
        error_stats(ref, torch.ones(3))


def test_atol_passes_near_zero_tensors():
    ref = torch.zeros(5)
    assert_close("z", ref, ref + 1e-9, 1e-6, atol=1e-8)
    with pytest.raises(AssertionError):
        assert_close("z", ref, ref + 1e-9, 1e-6)
