"""The contention model reproduces the MPS probes the profile cites.

The h100-80gb profile's contention terms are now fitted to co-located GPU trials; the probes
(single GEMM loops beside each other) read their own numbers, which its comments keep and the
model, given them, must reproduce.
"""

from dataclasses import replace

import pytest

from autotune.calibrate import FIT_PARAMS
from autotune.sim.contention import Contention
from autotune.sim.profile import load_profile

PROFILE_MPS = load_profile("h100-80gb").mps
#: What the probes read (the profile's [mps] comments): 1 - 5.37 / 13.90, the loss at 30% threads, 10.02 / 13.69..14.72.
MPS = replace(PROFILE_MPS, memory_bound_loss=0.614, memory_bound_loss_exponent=1.37, compute_bound_loss=0.29)


def test_thread_percentage_caps_the_trainer_speed():
    assert Contention(MPS, True, 0.25).trainer_speed == pytest.approx(0.31, abs=0.01)
    assert Contention(MPS, True, 1.0).trainer_speed == 1.0
    assert Contention(MPS, False, 0.25).trainer_speed == 1.0  # the % means nothing without MPS


@pytest.mark.parametrize("pct, duty, decode_ms, prefill_ms", [
    (1.0, 1.0, 13.90, 13.69),  # a closed loop of GEMMs beside it
    (1.0, 0.3, 6.45, 10.93),  # ... running 30% of the time
    (0.3, 1.0, 6.32, 14.72),  # ... at 30% active threads
])
def test_probe_slowdowns(pct, duty, decode_ms, prefill_ms):
    mem, comp = Contention(MPS, True, pct).server_stretch(duty)
    assert 5.37 * mem == pytest.approx(decode_ms, rel=0.06)
    assert 10.02 * comp == pytest.approx(prefill_ms, rel=0.10)


def test_the_profiles_fitted_contention_terms_lie_in_their_physical_ranges():
    ranges = {p.fields[0]: (p.low, p.high) for p in FIT_PARAMS if p.fields[0].startswith("mps.")}
    assert len(ranges) == 4
    for key, (low, high) in ranges.items():
        assert low <= getattr(PROFILE_MPS, key.split(".")[1]) <= high, key
    # beside a full-GPU trainer decode still loses more than prefill, and a capped trainer costs it less
    assert PROFILE_MPS.memory_bound_loss > PROFILE_MPS.compute_bound_loss
    capped, full = Contention(PROFILE_MPS, True, 0.3), Contention(PROFILE_MPS, True, 1.0)
    assert capped.server_stretch(1.0)[0] < full.server_stretch(1.0)[0]


def test_no_trainer_no_stretch_and_monotone_in_duty():
    c = Contention(MPS, True, 1.0)
    assert c.server_stretch(0.0) == (1.0, 1.0)
    stretches = [c.server_stretch(d)[0] for d in (0.1, 0.3, 0.6, 1.0)]
    assert stretches == sorted(stretches)
    assert c.trainer_gpu_stretch(0.0, 0.5) == 1.0 < c.trainer_gpu_stretch(0.9, 0.5)
    assert c.trainer_host_stretch(True) > c.trainer_host_stretch(False) == 1.0
