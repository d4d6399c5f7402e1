"""The profile reproduces the measurements it was fitted to."""

import pytest

from autotune.sim.calibration import CALIBRATION_PROFILE, POINTS, simulate_points


@pytest.fixture(scope="module")
def rows():
    return simulate_points()  # by default on the profile the points were measured on


def test_the_points_were_measured_on_the_h100():
    assert CALIBRATION_PROFILE == "h100-80gb"


@pytest.mark.parametrize("index", range(len(POINTS)), ids=[f"{p.name}:{p.metric}" for p in POINTS])
def test_calibration_point_within_tolerance(rows, index):
    point, simulated = rows[index]
    assert simulated == pytest.approx(point.target, rel=point.tolerance), (point, simulated)


def test_colocation_costs_serving_and_training(rows):
    by = {(p.name, p.metric): v for p, v in rows}
    assert by[("both, MPS", "tpot_p50_ms")] > 1.1 * by[("serving alone", "tpot_p50_ms")]
    assert by[("both, MPS", "peft_samples_per_s")] < by[("trainer alone", "peft_samples_per_s")]
