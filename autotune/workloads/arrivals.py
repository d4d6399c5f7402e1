"""Arrival times: Poisson and gamma (burstiness) as vLLM's benchmark draws
them, and rescaling of a recorded trace's gaps to a target mean rate.

vLLM's benchmark sends request 0 at once, then sleeps a gap drawn from
Gamma(shape=burstiness, scale=1/(R*burstiness)) before each next request: the
gaps have mean 1/R s and coefficient of variation 1/sqrt(burstiness);
burstiness 1 is a Poisson process, below 1 burstier. So request i arrives at
the sum of the first i gaps, the first at t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autotune.errors import UserError

# Stream key of the arrival generator, so that arrivals drawn with the same
# seed as the prompt lengths are not the same random numbers.
_ARRIVALS_STREAM = 1


def check_rate(rate_req_s: float) -> None:
    if not (isinstance(rate_req_s, (int, float)) and math.isfinite(rate_req_s) and rate_req_s > 0):
        raise UserError(f"request rate must be a finite number > 0 req/s, got {rate_req_s!r}")


def check_count(num_requests: int) -> None:
    if not isinstance(num_requests, int) or isinstance(num_requests, bool) or num_requests < 1:
        raise UserError(f"number of prompts must be an integer >= 1, got {num_requests!r}")


def gamma_arrivals(num_requests: int, rate_req_s: float, burstiness: float = 1.0,
                   seed: int = 0) -> np.ndarray:
    """Send times [num_requests] in s, first at 0, gamma gaps of mean 1/rate."""
    check_count(num_requests)
    check_rate(rate_req_s)
    if not (isinstance(burstiness, (int, float)) and math.isfinite(burstiness) and burstiness > 0):
        raise UserError(f"burstiness must be a finite number > 0 (1 = Poisson), got {burstiness!r}")
    rng = np.random.default_rng((seed, _ARRIVALS_STREAM))
    # One gap after each request, as vLLM's loop draws them; the last is unused.
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (rate_req_s * burstiness), size=num_requests)
    return np.concatenate(([0.0], np.cumsum(gaps_s[:-1])))


def poisson_arrivals(num_requests: int, rate_req_s: float, seed: int = 0) -> np.ndarray:
    """Send times [num_requests] in s of a Poisson process (exponential gaps), first at 0."""
    return gamma_arrivals(num_requests, rate_req_s, burstiness=1.0, seed=seed)


def rescale_gaps(timestamps_s: Sequence[float] | np.ndarray, rate_req_s: float) -> np.ndarray:
    """Send times [len(timestamps_s)] in s: the trace's gaps multiplied by one
    factor so that their mean is 1/rate, first at 0. Ratios between gaps (the
    burst shape) are kept."""
    check_rate(rate_req_s)
    ts = np.asarray(timestamps_s, dtype=np.float64)
    if ts.ndim != 1 or ts.size < 2:
        raise UserError(f"need at least 2 timestamps to rescale gaps, got {ts.size}")
    if not np.all(np.isfinite(ts)):
        raise UserError("timestamps must be finite numbers")
    gaps_s = np.diff(ts)
    if np.any(gaps_s < 0):
        i = int(np.argmax(gaps_s < 0))
        raise UserError(f"timestamps go back in time at position {i + 1} ({ts[i]:g} -> {ts[i + 1]:g} s)")
    mean_gap_s = float(gaps_s.mean())
    if mean_gap_s <= 0:
        raise UserError("all timestamps are equal: no gaps to rescale to a rate")
    scaled_s = gaps_s * ((1.0 / rate_req_s) / mean_gap_s)
    return np.concatenate(([0.0], np.cumsum(scaled_s)))
