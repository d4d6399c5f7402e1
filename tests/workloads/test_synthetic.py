import math

import numpy as np
import pytest

from autotune.errors import UserError
from autotune.workloads.synthetic import (
    BURSTGPT_LIKE_BURSTINESS,
    synthetic_burstgpt_arrivals,
    synthetic_sharegpt_lengths,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lengths_match_sharegpt_means(seed):
    pairs = np.array(synthetic_sharegpt_lengths(5000, seed))  # [5000, 2] tokens
    assert pairs[:, 0].mean() == pytest.approx(215, rel=0.04)
    assert pairs[:, 1].mean() == pytest.approx(198, rel=0.04)


def test_lengths_respect_vllm_filters_and_are_heavy_tailed():
    pairs = np.array(synthetic_sharegpt_lengths(5000, 0))
    prompt, answer = pairs[:, 0], pairs[:, 1]
    assert prompt.min() >= 4 and answer.min() >= 4
    assert prompt.max() <= 1024
    assert (prompt + answer).max() <= 2048
    assert prompt.max() > 900  # the tail reaches the limit
    assert np.percentile(prompt, 90) > 2.5 * np.median(prompt)
    assert pairs.dtype.kind == "i"


def test_lengths_deterministic_per_seed():
    assert synthetic_sharegpt_lengths(50, 3) == synthetic_sharegpt_lengths(50, 3)
    assert synthetic_sharegpt_lengths(50, 3) != synthetic_sharegpt_lengths(50, 4)
    assert synthetic_sharegpt_lengths(20, 3) == synthetic_sharegpt_lengths(50, 3)[:20]


def test_bursty_arrivals_mean_rate_and_cv():
    t = synthetic_burstgpt_arrivals(20000, rate_req_s=0.88, seed=0)
    g = np.diff(t)
    assert t[0] == 0.0
    assert g.mean() == pytest.approx(1 / 0.88, rel=0.04)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(BURSTGPT_LIKE_BURSTINESS), rel=0.05)
    assert g.std() / g.mean() > 1.3  # burstier than Poisson


def test_bursty_arrivals_deterministic_per_seed():
    a = synthetic_burstgpt_arrivals(100, 1.0, 5)
    assert np.array_equal(a, synthetic_burstgpt_arrivals(100, 1.0, 5))
    assert not np.array_equal(a, synthetic_burstgpt_arrivals(100, 1.0, 6))


def test_bad_count():
    with pytest.raises(UserError, match="number of prompts"):
        synthetic_sharegpt_lengths(0)


def test_more_requests_extend_fewer():
    assert synthetic_sharegpt_lengths(30, 1) == synthetic_sharegpt_lengths(3000, 1)[:30]
    assert np.array_equal(synthetic_burstgpt_arrivals(30, 1.0, 1), synthetic_burstgpt_arrivals(3000, 1.0, 1)[:30])
