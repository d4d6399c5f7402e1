import math

import numpy as np
import pytest

from autotune.errors import UserError
from autotune.workloads.arrivals import gamma_arrivals, poisson_arrivals, rescale_gaps


def _gaps(arrivals_s: np.ndarray) -> np.ndarray:
    return np.diff(arrivals_s)


def test_poisson_first_at_zero_mean_gap_and_cv_one():
    t = poisson_arrivals(20000, rate_req_s=4.0, seed=0)
    assert t.shape == (20000,)
    assert t[0] == 0.0
    assert np.all(_gaps(t) >= 0)
    g = _gaps(t)
    assert g.mean() == pytest.approx(0.25, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.04)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 4.0])
def test_gamma_gaps_mean_and_cv(burstiness):
    g = _gaps(gamma_arrivals(20000, rate_req_s=2.0, burstiness=burstiness, seed=3))
    assert g.mean() == pytest.approx(0.5, rel=0.04)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_gamma_with_burstiness_one_is_poisson():
    assert np.array_equal(gamma_arrivals(50, 1.5, 1.0, seed=7), poisson_arrivals(50, 1.5, seed=7))


def test_same_seed_same_arrivals_other_seed_different():
    a = gamma_arrivals(100, 1.0, 0.5, seed=1)
    assert np.array_equal(a, gamma_arrivals(100, 1.0, 0.5, seed=1))
    assert not np.array_equal(a, gamma_arrivals(100, 1.0, 0.5, seed=2))


def test_single_request_arrives_at_zero():
    assert poisson_arrivals(1, 3.0).tolist() == [0.0]


def test_rescale_gaps_by_hand():
    # gaps 1, 2, 4 s (mean 7/3) -> mean 0.5 s at 2 req/s: factor 3/14
    t = rescale_gaps([10.0, 11.0, 13.0, 17.0], rate_req_s=2.0)
    assert t == pytest.approx([0.0, 3 / 14, 9 / 14, 21 / 14])
    assert _gaps(t).mean() == pytest.approx(0.5)


def test_rescale_gaps_keeps_zero_gaps_and_ratios():
    raw = np.array([0.0, 0.0, 5.0, 6.0, 6.0, 26.0])
    t = rescale_gaps(raw, rate_req_s=0.88)
    ratio = _gaps(t)[np.diff(raw) > 0] / np.diff(raw)[np.diff(raw) > 0]
    assert ratio == pytest.approx(np.full(ratio.size, ratio[0]))
    assert _gaps(t)[np.diff(raw) == 0].tolist() == [0.0, 0.0]
    assert (len(t) - 1) / t[-1] == pytest.approx(0.88)  # req/s


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan])
def test_bad_rate(rate):
    with pytest.raises(UserError, match="rate"):
        poisson_arrivals(10, rate)
    with pytest.raises(UserError, match="rate"):
        rescale_gaps([0.0, 1.0], rate)


@pytest.mark.parametrize("burstiness", [0.0, -0.5, math.inf])
def test_bad_burstiness(burstiness):
    with pytest.raises(UserError, match="burstiness"):
        gamma_arrivals(10, 1.0, burstiness)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_count(n):
    with pytest.raises(UserError, match="number of prompts"):
        poisson_arrivals(n, 1.0)


@pytest.mark.parametrize("timestamps, match", [
    ([5.0], "at least 2"),
    ([1.0, 3.0, 2.0], "back in time at position 2"),
    ([4.0, 4.0, 4.0], "all timestamps are equal"),
    ([0.0, math.nan], "finite"),
])
def test_rescale_gaps_bad_timestamps(timestamps, match):
    with pytest.raises(UserError, match=match):
        rescale_gaps(timestamps, 1.0)
