"""autotune calibrate: measurements, the host-side fit and the profile file it writes.

The "GPU" here is the simulator on a profile whose host-side numbers were set
to known values: the fit, started from the base profile, must find them again.
"""

import json

import pytest
from typer.testing import CliRunner

from autotune.calibrate import (
    FIT_PARAMS,
    PREFILL_PROBE_MIN_TOKENS,
    PREFILL_PROBE_OUTPUT_TOKENS,
    Measured,
    Plan,
    check_prefill_prompt_tokens,
    fit_measured,
    load_measurements,
    measurements_json,
    measure,
    measurement_specs,
    parse_thread_pcts,
    profile_toml,
    targets_of,
)
from autotune.cli import app
from autotune.errors import UserError
from autotune.models import from_name
from autotune.sim.backend import SimBackend
from autotune.sim.fit import with_fields
from autotune.sim.profile import load_profile, parse_profile
from autotune.trial import TrialKind

LLAMA8B = from_name("llama-3.1-8b")
BASE = load_profile("h200-datasheet")
TRUE = {"serving.frontend_delay_ms": 14.0, "serving.iteration_overhead_ms": 0.8,
        "serving.seq_overhead_ms": 0.04, "trainer.gpu_eager_factor": 1.8,
        **{k: getattr(BASE.trainer, k.split(".")[1]) * 0.7
           for k in next(p for p in FIT_PARAMS if p.name == "trainer host time scale").fields}}


PLAN = Plan("llama-3.1-8b", (4.0, 24.0), 8.0, (10, 40))


@pytest.fixture(scope="module")
def measured():
    truth = SimBackend(with_fields(BASE, TRUE))
    return measure(truth.run_trial, PLAN.specs(LLAMA8B), progress=lambda line: None)


def test_measurements_are_serving_alone_at_each_rate_then_the_trainer_alone_uncapped_and_capped():
    specs = measurement_specs(LLAMA8B, rates_req_s=(2.0, 8.0), trial_seconds=10.0, mps_thread_pcts=(10, 40))
    assert [s.spec.kind for s in specs] == [TrialKind.SERVING_ALONE] * 2 + [TrialKind.TRAINER_ALONE] * 3
    assert [len(s.spec.workload) for s in specs[:2]] == [20, 80]
    assert specs[0].spec.policy.mps and specs[0].spec.policy.gpu_memory_utilization == 0.45
    assert all(s.spec.policy.trainer_seq_len_tokens == 512 and s.spec.workload is None for s in specs[2:])
    assert [s.spec.policy.trainer_mps_active_thread_pct for s in specs[2:]] == [100, 10, 40]
    assert all(s.spec.policy.mps for s in specs[2:])  # the cap is an MPS client setting
    assert len({s.spec.label for s in specs}) == 5  # each run its own logs and prompts


def test_thread_percentages_parse_or_fail_in_one_line():
    assert parse_thread_pcts("10, 40") == (10, 40)
    assert parse_thread_pcts("") == ()
    for bad in ("x", "0", "100", "12.5"):
        with pytest.raises(UserError, match="--mps-thread-pcts"):
            parse_thread_pcts(bad)


def test_the_fit_finds_known_host_side_numbers_and_the_trainer_gpu_time_again(measured):
    result = fit_measured(BASE, targets_of(measured), sweeps=4)
    for key in ("serving.frontend_delay_ms", "trainer.host_layer_backward_ms", "trainer.gpu_eager_factor"):
        assert result.fields[key] == pytest.approx(TRUE[key], rel=0.05), key
    assert max(abs(r) for r in result.residuals.values()) < 0.03
    assert result.loss < 1e-3


def test_a_crashed_measurement_is_left_out_of_the_targets(measured):
    crashed = [Measured(measured[0].measurement, {}, "server died")] + measured[1:]
    names = {t.name for t in targets_of(crashed)}
    assert measured[0].measurement.name not in names and "trainer alone" in names


def test_the_written_profile_loads_and_says_where_each_number_came_from(measured, tmp_path):
    result = fit_measured(BASE, targets_of(measured), sweeps=1)
    machine = {"gpu": "NVIDIA H200", "gpus": 1, "driver": "580.159.04", "torch": "2.11.0", "vllm": "0.20.0"}
    text = profile_toml("my-h200", BASE, result, machine, measured, "autotune calibrate --out x.toml")
    p = parse_profile(text, "my-h200.toml")
    assert p.name == "my-h200" and p.carries == "h100-80gb" and p.status == "modelled"
    assert p.datasheet.memory_bandwidth_gb_s == BASE.datasheet.memory_bandwidth_gb_s
    assert p.serving.frontend_delay_ms == pytest.approx(result.fields["serving.frontend_delay_ms"], rel=1e-5)
    assert p.field_provenance["serving.frontend_delay_ms"] == "fitted"
    assert p.field_provenance["mps.memory_bound_loss"] == "fitted on h100-80gb"  # carried, not refitted here
    assert "580.159.04" in text and "vllm 0.20.0" in text


def test_calibrate_refuses_to_overwrite_and_needs_the_gpu_extras(tmp_path):
    runner = CliRunner()
    existing = tmp_path / "mine.toml"
    existing.write_text("keep me")
    result = runner.invoke(app, ["calibrate", "--out", str(existing)])
    assert result.exit_code == 2 and "exists" in result.output
    assert existing.read_text() == "keep me"
    result = runner.invoke(app, ["calibrate", "--out", str(tmp_path / "new.toml"), "--rates", "4,x"])
    assert result.exit_code == 2 and "--rates" in result.output


def test_measurements_round_trip_and_refit_without_a_gpu(measured, tmp_path):
    machine = {"gpu": "NVIDIA H200", "gpus": 1, "cpu": "some CPU"}
    text = measurements_json(PLAN, machine, "h200-datasheet", measured)
    plan, got_machine, base, back = load_measurements(text, "m.json")
    assert (plan, got_machine, base) == (PLAN, machine, "h200-datasheet")
    assert [t.value for t in targets_of(back)] == [t.value for t in targets_of(measured)]
    assert [t.spec for t in targets_of(back)] == [t.spec for t in targets_of(measured)]  # the same trial specs
    raw = tmp_path / "m.measurements.json"
    raw.write_text(text)
    out = tmp_path / "m.toml"  # beside its own measurements: a refit writes only the profile
    result = CliRunner().invoke(app, ["calibrate", "--out", str(out), "--refit", str(raw)])
    assert result.exit_code == 0, result.output
    p = load_profile(str(out))
    assert p.serving.frontend_delay_ms == pytest.approx(TRUE["serving.frontend_delay_ms"], rel=0.05)
    assert "--refit m.measurements.json" in out.read_text()
    assert raw.read_text() == text


def test_refit_refuses_measuring_flags_and_a_file_that_is_not_one(tmp_path):
    runner = CliRunner()
    raw = tmp_path / "m.json"
    raw.write_text('{"plan": {}}')
    result = runner.invoke(app, ["calibrate", "--out", str(tmp_path / "a.toml"), "--refit", str(raw), "--rates", "8"])
    assert result.exit_code == 2 and "leave out --rates" in result.output
    result = runner.invoke(app, ["calibrate", "--out", str(tmp_path / "a.toml"), "--refit", str(raw)])
    assert result.exit_code == 2 and "not a calibration's measurements file" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "a.toml").exists()


def test_each_stage_fits_the_part_of_the_model_its_measurement_reflects(measured):
    """A TPOT that needs other engine costs moves only the engine's numbers, not the API server's delay."""
    slow = [Measured(m.measurement, {k: v * (1.1 if k == "tpot_p50_ms" else 1.0) for k, v in m.values.items()})
            for m in measured]
    a, b = fit_measured(BASE, targets_of(measured), sweeps=3), fit_measured(BASE, targets_of(slow), sweeps=3)
    assert b.fields["serving.iteration_overhead_ms"] > a.fields["serving.iteration_overhead_ms"]
    assert b.fields["trainer.gpu_eager_factor"] == pytest.approx(a.fields["trainer.gpu_eager_factor"], rel=1e-6)


# ---------------------------------------------------------------- co-located trials: the contention terms

def test_colocated_measurements_run_the_study_trial_at_the_busiest_rate_each_with_its_own_prompts():
    specs = measurement_specs(LLAMA8B, rates_req_s=(4.0, 24.0), trial_seconds=10.0, mps_thread_pcts=(),
                              colocated_thread_pcts=(10, 40))
    colocated = specs[3:]
    assert [s.spec.kind for s in specs] == [TrialKind.SERVING_ALONE] * 2 + [TrialKind.TRAINER_ALONE] + [
        TrialKind.COLOCATED] * 2
    assert [m.spec.policy.trainer_mps_active_thread_pct for m in colocated] == [10, 40]
    assert all(m.spec.workload.rate_req_s == 24.0 and len(m.spec.workload) == 240 for m in colocated)
    assert colocated[0].spec.workload == specs[1].spec.workload  # the same arrivals as serving alone at 24
    assert len({m.spec.label for m in specs}) == len(specs)  # run folders and GPU prompts of their own
    assert measurement_specs(LLAMA8B, (4.0, 24.0), 10.0, ()) == specs[:3]  # none unless asked
    plan = Plan("llama-3.1-8b", (4.0, 24.0), 10.0, (), colocated_thread_pcts=(10, 40))
    got = [Measured(m, {"ttft_p99_ms": 60.0, "tpot_p99_ms": 9.0, "peft_samples_per_s": 3.0}) for m in colocated]
    back_plan, _, _, back = load_measurements(measurements_json(plan, {"gpus": 1}, "h200", got), "x")
    assert back_plan == plan and [b.measurement.spec for b in back] == [m.spec for m in colocated]


def test_colocated_thread_pcts_are_checked():
    assert parse_thread_pcts("10,100", "--colocated-thread-pcts", uncapped=True) == (10, 100)
    with pytest.raises(UserError, match="--colocated-thread-pcts: 0 is not in 1..100"):
        parse_thread_pcts("0", "--colocated-thread-pcts", uncapped=True)
    result = CliRunner().invoke(app, ["calibrate", "--out", "x.toml", "--colocated-thread-pcts", "ten"])
    assert result.exit_code == 2 and "--colocated-thread-pcts: 'ten'" in result.output


SHORT_COLOCATED = {"system": "vllm-torchtune", "figure": "fig8a", "rate_req_s": 8.0,
                   "params": {"mps_active_thread_pct": 60}, "num_prompts": None, "trial_seconds": 8.0, "seed": 0}


def test_a_colocated_measurement_is_the_studys_trial_and_round_trips_through_the_measurements_file():
    from autotune.calibrate import colocated_measurement

    m = colocated_measurement(LLAMA8B, SHORT_COLOCATED, "co-located 60%")
    assert m.spec.kind is TrialKind.COLOCATED and m.spec.policy.trainer_mps_active_thread_pct == 60
    assert m.metrics == ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s")
    plan = Plan("llama-3.1-8b", (8.0,), 8.0, ())
    got = [Measured(m, {"ttft_p99_ms": 60.0, "tpot_p99_ms": 9.0, "peft_samples_per_s": 3.0})]
    _, _, _, back = load_measurements(measurements_json(plan, {"gpus": 1}, "h100-80gb", got), "x")
    assert back[0].measurement.spec.workload == m.spec.workload and back[0].values == got[0].values


def test_what_the_targets_do_not_resolve_keeps_the_base_number():
    """One serving rate and no capped trainer: the per-request cost and the trainer's GPU
    factor are not fitted (a fit would set them anywhere along a valley)."""
    base = load_profile("h100-80gb")
    plan = Plan("llama-3.1-8b", (8.0,), 8.0, ())
    truth = SimBackend(with_fields(base, {"serving.iteration_overhead_ms": 1.6}))
    got = measure(truth.run_trial, plan.specs(LLAMA8B), progress=lambda line: None)
    result = fit_measured(base, targets_of(got), sweeps=2)
    assert "serving.seq_overhead_ms" not in result.fields and "trainer.gpu_eager_factor" not in result.fields
    assert result.fields["serving.iteration_overhead_ms"] == pytest.approx(1.6, rel=0.05)


def test_colocated_trials_fit_the_contention_terms_and_nothing_else_moves_them():
    from autotune.calibrate import colocated_measurement

    base = load_profile("h100-80gb")
    truth = SimBackend(with_fields(base, {"mps.compute_bound_loss": 0.5, "mps.trainer_host_slowdown": 0.2}))
    specs = [colocated_measurement(LLAMA8B, {**SHORT_COLOCATED, "params": {"mps_active_thread_pct": pct}}, f"{pct}%")
             for pct in (40, 100)]
    got = measure(truth.run_trial, specs, progress=lambda line: None)
    result = fit_measured(base, targets_of(got), sweeps=2)
    assert set(result.fields) == {"mps.memory_bound_loss", "mps.memory_bound_loss_exponent",
                                  "mps.compute_bound_loss", "mps.trainer_host_slowdown"}
    assert result.loss < 0.01  # the truth is inside the ranges
    fitted = {k: r for k, r in result.residuals.items() if not k.endswith("ttft_p99_ms")}  # P99 TTFT: weight 0
    assert len(fitted) == 4 and all(abs(r) < 0.06 for r in fitted.values()), fitted


def test_the_prefill_probe_is_long_prompts_one_at_a_time():
    specs = measurement_specs(LLAMA8B, rates_req_s=(4.0,), trial_seconds=8.0, mps_thread_pcts=(),
                              prefill_prompt_tokens=1536)
    assert [m.name for m in specs] == ["serving alone, fig8a 4 req/s", "serving alone, 1536-token prompts",
                                       "trainer alone"]
    probe = specs[1]
    assert probe.spec.kind is TrialKind.SERVING_ALONE and probe.metrics == ("ttft_p50_ms",)
    requests = probe.spec.workload.requests
    assert len(requests) == 20 and {(r.prompt_len, r.output_len) for r in requests} == {(1536, PREFILL_PROBE_OUTPUT_TOKENS)}
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    assert 0.5 < sum(gaps) / len(gaps) < 2.0  # about one a second: prefills rarely meet
    assert measurement_specs(LLAMA8B, (4.0,), 8.0, ()) == specs[:1] + specs[2:]  # no probe unless asked


def test_the_prefill_probe_length_is_checked():
    assert check_prefill_prompt_tokens(0, 2048) == 0 and check_prefill_prompt_tokens(1536, 2048) == 1536
    for bad in (PREFILL_PROBE_MIN_TOKENS - 1, 2048 - PREFILL_PROBE_OUTPUT_TOKENS + 1, -5):
        with pytest.raises(UserError, match="--prefill-prompt-tokens"):
            check_prefill_prompt_tokens(bad, 2048)
    result = CliRunner().invoke(app, ["calibrate", "--out", "x.toml", "--prefill-prompt-tokens", "100"])
    assert result.exit_code == 2 and "--prefill-prompt-tokens" in result.output


def test_the_prefill_probe_fits_the_prefills_cost_and_without_it_the_base_number_stays():
    """The prefill's cost (non-GEMM share of its compute) moves a probe's P50 TTFT far more than a
    ShareGPT-like run's: with the probe the fit finds it again; without it, it is not fitted."""
    base = load_profile("h100-80gb")
    truth = SimBackend(with_fields(base, {"serving.nongemm_compute_fraction": 0.6,
                                          "serving.frontend_delay_ms": 14.0}))
    plan = Plan("llama-3.1-8b", (8.0,), 8.0, (), prefill_prompt_tokens=1536)
    got = measure(truth.run_trial, plan.specs(LLAMA8B), progress=lambda line: None)
    result = fit_measured(base, targets_of(got), sweeps=3)
    assert result.fields["serving.nongemm_compute_fraction"] == pytest.approx(0.6, rel=0.1)
    # a ShareGPT-like run's P50 TTFT moves by about 1 ms, up and down, with the prefill's cost (its
    # batches regroup): the API server's delay trades within that against it
    assert result.fields["serving.frontend_delay_ms"] == pytest.approx(14.0, rel=0.1)
    assert max(abs(r) for r in result.residuals.values()) < 0.03
    without = [m for m in got if "token prompts" not in m.measurement.name]
    assert "serving.nongemm_compute_fraction" not in fit_measured(base, targets_of(without), sweeps=1).fields


def test_a_plan_from_before_the_probe_loads_without_one():
    plan = Plan("llama-3.1-8b", (8.0,), 8.0, ())
    text = measurements_json(plan, {"gpus": 1}, "h100-80gb", [])
    old = json.loads(text)
    del old["plan"]["prefill_prompt_tokens"]
    back, _, _, _ = load_measurements(json.dumps(old), "old.json")
    assert back == plan and back.prefill_prompt_tokens == 0
