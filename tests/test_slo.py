"""SLOs: the paper's absolute limits by default, a ratio of serving alone
where one is given, never both for one metric."""

from __future__ import annotations

import pytest

from autotune.errors import UserError
from autotune.metrics import RequestRecord, serving_metrics
from autotune.models import from_name
from autotune.slo import PAPER_SLO_SOURCE, ResolvedSlo, SloSpec, paper_slo, resolve
from autotune.study import run_study
from autotune.trial import TrialResult

from tests.test_study import ScriptedBackend, _config

LLAMA8B = from_name("llama-3.1-8b")
LLAMA13B = from_name("llama-2-13b")


def reference(ttft_ms: float, tpot_ms: float) -> TrialResult:
    """Serving alone: every request's first token after ``ttft_ms``, then one every ``tpot_ms``."""
    recs = [RequestRecord(100, 20, float(i), tuple(i + (ttft_ms + k * tpot_ms) / 1000 for k in range(20)))
            for i in range(10)]
    return TrialResult(serving=serving_metrics(recs), peft=None)


def test_the_papers_limits_by_model_size():
    assert paper_slo(LLAMA8B) == (500.0, 50.0)
    assert paper_slo(from_name("llama-3.2-1b")) == (500.0, 50.0)
    assert paper_slo(LLAMA13B) == (500.0, 80.0)


def test_nothing_given_means_the_papers_limits_and_needs_no_reference():
    spec = SloSpec()
    assert (spec.ttft_ratio, spec.tpot_ratio) == (None, None) and not spec.needs_reference
    assert resolve(spec, None, LLAMA8B) == ResolvedSlo(500.0, 50.0, PAPER_SLO_SOURCE, PAPER_SLO_SOURCE)
    assert resolve(spec, TrialResult.crash("server died"), LLAMA13B) == ResolvedSlo(500.0, 80.0, PAPER_SLO_SOURCE,
                                                                                     PAPER_SLO_SOURCE)
    assert resolve(spec, reference(30.0, 8.0), LLAMA8B).tpot_p99_ms == 50.0  # not the reference's


def test_absolute_limits_stand():
    got = resolve(SloSpec(ttft_p99_ms=75.0, tpot_p99_ms=9.0), reference(30.0, 8.0), LLAMA13B)
    assert got == ResolvedSlo(75.0, 9.0, "absolute", "absolute")


def test_a_ratio_still_resolves_against_the_reference():
    spec = SloSpec(ttft_ratio=2.0, tpot_ratio=1.5)
    assert spec.needs_reference
    got = resolve(spec, reference(30.0, 8.0), LLAMA8B)
    assert got.ttft_p99_ms == pytest.approx(60.0) and got.tpot_p99_ms == pytest.approx(12.0)
    assert got.ttft_basis == "2x serving-alone P99 (30.00 ms)" and got.tpot_basis == "1.5x serving-alone P99 (8.00 ms)"
    with pytest.raises(UserError, match=r"relative ttft SLO: the serving-alone reference run failed \(server died\)"):
        resolve(spec, TrialResult.crash("server died"), LLAMA8B)


def test_each_metric_on_its_own_basis():
    got = resolve(SloSpec(ttft_ratio=2.0), reference(30.0, 8.0), LLAMA13B)
    assert got.ttft_p99_ms == pytest.approx(60.0) and got.tpot_p99_ms == 80.0
    assert got.tpot_basis == PAPER_SLO_SOURCE
    got = resolve(SloSpec(tpot_p99_ms=20.0, ttft_ratio=3.0), reference(30.0, 8.0), LLAMA8B)
    assert (got.ttft_p99_ms, got.tpot_p99_ms) == (pytest.approx(90.0), 20.0)


@pytest.mark.parametrize("given, metric", [
    ({"ttft_p99_ms": 400.0, "ttft_ratio": 2.0}, "ttft"),
    ({"tpot_p99_ms": 40.0, "tpot_ratio": 1.5}, "tpot"),
])
def test_an_absolute_limit_and_a_ratio_for_one_metric_is_a_user_error(given, metric):
    with pytest.raises(UserError, match=f"give --slo-{metric}-ms or --slo-{metric}-ratio, not both"):
        SloSpec(**given)


@pytest.mark.parametrize("given", [{"ttft_ratio": 0.0}, {"tpot_ratio": -1.5}, {"tpot_p99_ms": 0.0}])
def test_limits_must_be_positive(given):
    with pytest.raises(UserError, match="must be positive"):
        SloSpec(**given)


def test_a_study_with_no_slo_given_holds_trials_to_the_papers_limits(tmp_path):
    # Scripted: serving alone 30 ms TTFT; beside the trainer at p % TTFT = 29 + 0.5 p ms, far below 500 ms
    ctx = run_study(_config(tmp_path, sampler="random", slo=SloSpec()), ScriptedBackend(), n_trials=1)
    assert ctx.slo == ResolvedSlo(500.0, 50.0, PAPER_SLO_SOURCE, PAPER_SLO_SOURCE)
    assert ctx.study.user_attrs["slo"]["ttft_p99_ms"] == 500.0
    t = ctx.study.trials[0]  # p = 80: 69 ms
    assert t.constraints["ttft_p99"] == pytest.approx(69 / 500 - 1)
    assert t.user_attrs["outcome"] == "feasible"


def test_a_missing_limit_is_never_met():
    from autotune.slo import constraint_margins

    served = reference(55.0, 55.0)
    with pytest.raises(ValueError, match="resolved SLO"):
        constraint_margins(served, None)
    alone = TrialResult(serving=None, peft=None)  # fig12: nothing served, nothing to hold it to
    assert constraint_margins(alone, None) == {"ttft_p99": -1.0, "tpot_p99": -1.0}


def test_trials_cannot_run_before_the_slo_is_resolved(tmp_path):
    # prepare() then run_trials() with a 1 ms SLO once stored 55 ms trials as feasible
    from autotune.backends import make_backend
    from autotune.study import StudyConfig, StudyObserver, prepare, run_trials

    config = StudyConfig(system="llmstation", figure="fig8a", num_prompts=5, runs_dir=tmp_path,
                         slo=SloSpec(ttft_p99_ms=1.0, tpot_p99_ms=1.0))
    ctx = prepare(config, make_backend("sim"))
    with pytest.raises(RuntimeError, match="run_references"):
        run_trials(ctx, 1, StudyObserver())
    assert not ctx.study.trials
