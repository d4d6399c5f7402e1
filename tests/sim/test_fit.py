"""autotune.sim.fit: the fit recovers host-side numbers it is given synthetic
measurements of (made by the simulator itself on a profile with known values),
``with_fields`` edits measured sections only, ``Param.apply`` sets or scales."""

from dataclasses import replace

import pytest

from autotune.sim.backend import SimBackend
from autotune.sim.calibration import calibration_spec, calibration_workload
from autotune.sim.fit import Param, Target, fit, with_fields
from autotune.sim.profile import load_profile
from autotune.trial import TrialKind

TRAINER_HOST = ("trainer.host_embed_ms", "trainer.host_layer_forward_ms", "trainer.host_head_loss_ms",
                "trainer.host_layer_backward_ms", "trainer.host_optimizer_ms")
PARAMS = (
    Param("frontend delay", ("serving.frontend_delay_ms",), 2.0, 40.0),
    Param("iteration overhead", ("serving.iteration_overhead_ms",), 0.2, 4.0),
    Param("trainer host time scale", TRAINER_HOST, 0.2, 1.5, scale=True),
)
# The "GPU": h100-80gb with these host-side numbers (its own: 21 ms, 1.24 ms, scale 1).
KNOWN = {"frontend delay": 12.0, "iteration overhead": 0.8, "trainer host time scale": 0.7}


def run(profile, spec):
    return SimBackend(profile).run_trial(spec)


def field(profile, key):
    section, name = key.split(".")
    return getattr(getattr(profile, section), name)


def known_profile(base):
    fields = {}
    for p in PARAMS:
        fields.update(p.apply(base, KNOWN[p.name]))
    return with_fields(base, fields)


def synthetic_targets(truth):
    """Serving alone (24 fixed-length requests at 8 req/s) and the trainer alone, measured on ``truth``."""
    serving = replace(calibration_spec(TrialKind.SERVING_ALONE, 100, 0),
                      workload=calibration_workload(0, rate_req_s=8.0, num_requests=24))
    trainer = calibration_spec(TrialKind.TRAINER_ALONE, 100, 0)
    got_serving, got_trainer = run(truth, serving).metrics(), run(truth, trainer).metrics()
    return [
        Target("serving alone", serving, "ttft_p50_ms", got_serving["ttft_p50_ms"]),
        Target("serving alone", serving, "tpot_p50_ms", got_serving["tpot_p50_ms"], weight=2.0),
        Target("trainer alone", trainer, "peft_samples_per_s", got_trainer["peft_samples_per_s"], weight=2.0),
    ]


def test_fit_recovers_known_host_side_numbers_from_synthetic_measurements():
    base = load_profile("h100-80gb")
    truth = known_profile(base)
    targets = synthetic_targets(truth)
    # the base profile is far from the truth: the fit has something to do
    start = {f"{t.name}: {t.metric}": run(base, t.spec).metrics()[t.metric] / t.value - 1 for t in targets}
    assert all(abs(r) > 0.03 for r in start.values()), start

    result = fit(base, targets, PARAMS, run, sweeps=3, steps=16)

    assert result.values == pytest.approx(KNOWN, rel=0.02)
    for p in PARAMS:  # the fitted numbers, field by field, are the truth's
        for key in p.fields:
            assert result.fields[key] == pytest.approx(field(truth, key), rel=0.02), key
            assert field(result.profile, key) == result.fields[key]
    assert set(result.residuals) == set(start)
    assert all(abs(r) < 0.005 for r in result.residuals.values()), result.residuals
    assert result.loss < 1e-4
    assert result.targets == ("serving alone", "serving alone", "trainer alone")
    # fields no Param names stay the base's
    assert result.profile.serving.seq_overhead_ms == base.serving.seq_overhead_ms
    assert result.profile.efficiency == base.efficiency and result.profile.mps == base.mps
    assert result.profile.trainer.host_gpu_sharpness == base.trainer.host_gpu_sharpness


def test_with_fields_replaces_the_named_fields_only():
    base = load_profile("h100-80gb")
    p = with_fields(base, {"serving.seq_overhead_ms": 0.05, "trainer.host_optimizer_ms": 1.5})
    assert p.serving.seq_overhead_ms == 0.05 and p.trainer.host_optimizer_ms == 1.5
    assert base.serving.seq_overhead_ms == 0.0 and base.trainer.host_optimizer_ms == 3.2943  # not edited in place
    assert replace(p.serving, seq_overhead_ms=0.0) == base.serving
    assert replace(p.trainer, host_optimizer_ms=3.2943) == base.trainer
    assert (p.datasheet, p.efficiency, p.mps) == (base.datasheet, base.efficiency, base.mps)


@pytest.mark.parametrize("key", ["datasheet.memory_bandwidth_gb_s", "datasheet.gpus"])
def test_with_fields_refuses_a_datasheet_field(key):
    base = load_profile("h100-80gb")
    with pytest.raises(ValueError, match="only measured sections are fitted"):
        with_fields(base, {key: 1.0})
    with pytest.raises(ValueError, match="only measured sections are fitted"):  # even beside a measured one
        with_fields(base, {"serving.frontend_delay_ms": 10.0, key: 1.0})


def test_param_apply_sets_one_value_or_scales_every_field():
    base = load_profile("h100-80gb")
    scaled = Param("trainer host time scale", TRAINER_HOST, 0.2, 1.5, scale=True).apply(base, 0.5)
    assert scaled == {key: pytest.approx(field(base, key) * 0.5) for key in TRAINER_HOST}
    assert scaled["trainer.host_layer_backward_ms"] == pytest.approx(3.35607)  # 6.71214 x 0.5
    both = Param("overheads", ("serving.iteration_overhead_ms", "serving.seq_overhead_ms"), 0.0, 2.0).apply(base, 0.3)
    assert both == {"serving.iteration_overhead_ms": 0.3, "serving.seq_overhead_ms": 0.3}  # set, not scaled
