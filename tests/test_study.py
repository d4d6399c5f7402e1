"""The study loop: constraints on every trial, crashes, resume, SLOs, Ctrl-C,
a failing disk."""

from __future__ import annotations

import errno
import json

import optuna
import pytest

from autotune.backends import Backend
from autotune.errors import EnvironmentFailure, UserError
from autotune.metrics import PeftMetrics, RequestRecord, serving_metrics
from autotune.records import TrialRow, reference_metrics
from autotune.results import StudyResult, write_json
from autotune.slo import CRASH_VIOLATION, SloSpec
from autotune.samplers import N_STARTUP_TRIALS, SAMPLERS
from autotune.study import StudyConfig, enqueue_settings, run_study
from autotune.trial import TrialKind, TrialResult, TrialSpec


class ScriptedBackend(Backend):
    """Known answers: serving alone has P99 TTFT 30 ms and TPOT 8 ms; beside
    the trainer at p % of the SMs, TTFT = 29 + 0.5 p ms and PEFT = 3 p / 100
    samples/s. At p = 35 the trial crashes."""

    name = "scripted"

    def __init__(self, crash_at: int | None = 35, interrupt_at: int | None = None,
                 disk_full_at_trial: int | None = None) -> None:
        self.calls: list[TrialSpec] = []
        self.crash_at = crash_at
        self.interrupt_at = interrupt_at
        self.disk_full_at_trial = disk_full_at_trial

    @staticmethod
    def _records(spec: TrialSpec, ttft_s: float, tpot_s: float) -> list[RequestRecord]:
        out = []
        for r in spec.workload.requests:
            times = tuple(r.arrival_s + ttft_s + k * tpot_s for k in range(r.output_len))
            out.append(RequestRecord(r.prompt_len, r.output_len, r.arrival_s, times))
        return out

    def run_trial(self, spec, progress=lambda f, s: None):
        self.calls.append(spec)
        if spec.kind is TrialKind.TRAINER_ALONE:
            return TrialResult(serving=None, peft=PeftMetrics(3.0, 1536.0, 60, 20.0))
        if spec.kind is TrialKind.SERVING_ALONE:
            return TrialResult(serving=serving_metrics(self._records(spec, 0.030, 0.008)), peft=None)
        pct = spec.params["mps_active_thread_pct"]
        if pct == self.interrupt_at:
            raise KeyboardInterrupt
        if spec.number is not None and spec.number == self.disk_full_at_trial:
            raise OSError(errno.ENOSPC, "No space left on device", "trial.log")
        if pct == self.crash_at:
            return TrialResult.crash("trainer out of memory")
        serving = serving_metrics(self._records(spec, (29 + 0.5 * pct) / 1000, 0.008))
        peft = PeftMetrics(3.0 * pct / 100, 1536.0 * pct / 100, 10, 20.0)
        return TrialResult(serving=serving, peft=peft)


#: The study tests hold trials to the scripted server alone: 2x its P99 TTFT (60 ms), 1.5x its TPOT (12 ms).
RELATIVE_SLO = SloSpec(ttft_ratio=2.0, tpot_ratio=1.5)


def _config(tmp_path, **kw) -> StudyConfig:
    base = dict(system="vllm-torchtune", figure="fig8a", rate_req_s=2.0, num_prompts=20,
                sampler="grid", runs_dir=tmp_path, seed=0, slo=RELATIVE_SLO)
    base.update(kw)
    return StudyConfig(**base)


def test_every_finished_trial_has_both_constraints_and_crashes_are_infeasible(tmp_path):
    ctx = run_study(_config(tmp_path), ScriptedBackend(), n_trials=25)
    trials = ctx.study.trials
    assert len(trials) == 19  # the grid of 10..100 step 5, then the study stops
    for t in trials:
        assert set(t.constraints) == {"ttft_p99", "tpot_p99"}, t.number
    crashed = [t for t in trials if t.params["mps_active_thread_pct"] == 35]
    assert len(crashed) == 1
    c = crashed[0]
    assert c.state == optuna.trial.TrialState.COMPLETE and c.value == 0.0
    assert c.constraints == {"ttft_p99": CRASH_VIOLATION, "tpot_p99": CRASH_VIOLATION}
    assert c.user_attrs["outcome"] == "crashed" and c.user_attrs["error"] == "trainer out of memory"
    # SLO: TTFT <= 2 x 30 ms, so p <= 60 is feasible; the best is p = 60.
    assert ctx.slo.ttft_p99_ms == pytest.approx(60.0)
    assert ctx.slo.tpot_p99_ms == pytest.approx(12.0)
    assert ctx.study.best_trial.params == {"mps_active_thread_pct": 60}
    assert StudyResult.of(ctx.study).best.params == {"mps_active_thread_pct": 60}


def test_first_trial_is_the_artifacts_example(tmp_path):
    ctx = run_study(_config(tmp_path, sampler="tpe"), ScriptedBackend(), n_trials=2)
    assert ctx.study.trials[0].params == {"mps_active_thread_pct": 80}


def test_margins_are_relative_and_signed(tmp_path):
    ctx = run_study(_config(tmp_path, sampler="random"), ScriptedBackend(), n_trials=1)
    t = ctx.study.trials[0]  # p = 80: TTFT 69 ms against 60 ms
    assert t.constraints["ttft_p99"] == pytest.approx(69 / 60 - 1)
    assert t.constraints["tpot_p99"] == pytest.approx(8 / 12 - 1)
    assert t.user_attrs["outcome"] == "infeasible"
    assert t.user_attrs["metrics"]["serving"]["ttft"]["p99_ms"] == pytest.approx(69.0)


def test_absolute_slo(tmp_path):
    ctx = run_study(_config(tmp_path, sampler="random", slo=SloSpec(ttft_p99_ms=75.0, tpot_p99_ms=9.0)),
                    ScriptedBackend(), 1)
    assert (ctx.slo.ttft_p99_ms, ctx.slo.tpot_p99_ms) == (75.0, 9.0)
    assert ctx.study.trials[0].user_attrs["outcome"] == "feasible"


def test_resume_adds_trials_and_reuses_the_references(tmp_path):
    first = ScriptedBackend()
    run_study(_config(tmp_path, sampler="random"), first, n_trials=3)
    assert sum(s.kind is not TrialKind.COLOCATED for s in first.calls) == 2
    again = ScriptedBackend()
    ctx = run_study(_config(tmp_path, sampler="random"), again, n_trials=2)
    assert len(ctx.study.trials) == 5
    assert all(s.kind is TrialKind.COLOCATED for s in again.calls)  # references stored with the study


def test_resume_with_other_settings_is_refused(tmp_path):
    run_study(_config(tmp_path), ScriptedBackend(), n_trials=1)
    with pytest.raises(UserError, match="exists with other settings"):
        run_study(_config(tmp_path, num_prompts=30, study_name="vllm-torchtune-fig8a-2rps-scripted"),
                  ScriptedBackend(), n_trials=1)


def test_ctrl_c_records_the_trial_as_failed_with_constraints(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_study(_config(tmp_path, sampler="random"), ScriptedBackend(interrupt_at=80), n_trials=3)
    study = optuna.load_study(study_name="vllm-torchtune-fig8a-2rps-scripted",
                              storage=f"sqlite:///{tmp_path / 'studies.db'}")
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.FAIL
    assert t.user_attrs["error"] == "interrupted (Ctrl-C)"
    assert set(t.constraints) == {"ttft_p99", "tpot_p99"}


def test_a_full_disk_ends_the_study_with_the_trial_failed_not_running(tmp_path):
    with pytest.raises(EnvironmentFailure, match="cannot write trial.log: No space left on device"):
        run_study(_config(tmp_path, sampler="random"), ScriptedBackend(disk_full_at_trial=2), n_trials=5)
    study = optuna.load_study(study_name="vllm-torchtune-fig8a-2rps-scripted",
                              storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    t = study.trials[-1]
    assert t.constraints == {"ttft_p99": CRASH_VIOLATION, "tpot_p99": CRASH_VIOLATION}
    assert t.user_attrs["outcome"] == "failed" and "No space left" in t.user_attrs["error"]
    assert StudyResult.of(study).rows[-1].outcome == "failed"  # never feasible, never the best


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_before_the_study(tmp_path, seed):
    with pytest.raises(UserError, match=r"--seed must be in 0\.\.4294967295"):
        run_study(_config(tmp_path, seed=seed), ScriptedBackend(), 1)
    assert not (tmp_path / "studies.db").exists()


def test_the_largest_seed_resumes(tmp_path):
    run_study(_config(tmp_path, sampler="random", seed=2**32 - 1), ScriptedBackend(), 1)
    ctx = run_study(_config(tmp_path, sampler="random", seed=2**32 - 1), ScriptedBackend(), 1)  # sampler seed wraps
    assert len(ctx.study.trials) == 2


def test_a_tokenizer_without_sharegpt_is_refused(tmp_path):
    with pytest.raises(UserError, match="--tokenizer .* give --sharegpt FILE too"):
        run_study(_config(tmp_path, tokenizer_path=tmp_path / "tokenizer.json"), ScriptedBackend(), 1)


def test_a_runs_dir_that_is_a_file_makes_no_study(tmp_path):
    notes = tmp_path / "notes"
    notes.write_text("mine")
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with pytest.raises(UserError, match="--runs-dir .*notes is a file, not a folder"):
        run_study(_config(tmp_path, runs_dir=notes, storage=storage), ScriptedBackend(), 1)
    assert notes.read_text() == "mine" and not (tmp_path / "elsewhere.db").exists()


def test_figure_restricted_to_one_system(tmp_path):
    with pytest.raises(UserError, match="fig12 is for llmstation only"):
        run_study(_config(tmp_path, figure="fig12"), ScriptedBackend(), 1)


@pytest.mark.parametrize("url, match", [
    ("nosuchdb://x", "unusable storage URL"),
    ("sqlite:////proc/forbidden/dir/studies.db", "cannot create"),
])
def test_bad_storage_url(tmp_path, url, match):
    with pytest.raises(UserError, match=match):
        run_study(_config(tmp_path, storage=url), ScriptedBackend(), 1)


def test_not_an_sqlite_file_is_refused_and_left_alone(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="not an SQLite database"):
        run_study(_config(tmp_path, storage=f"sqlite:///{notes}"), ScriptedBackend(), 1)
    assert notes.read_text() == "my notes"


def test_results_json(tmp_path):
    ctx = run_study(_config(tmp_path), ScriptedBackend(), n_trials=19)
    path = tmp_path / "out.json"
    write_json(StudyResult.of(ctx.study), path)
    doc = json.loads(path.read_text())
    assert doc["system"] == "vllm-torchtune" and doc["figure"] == "fig8a" and doc["rate_req_s"] == 2.0
    assert doc["backend"] == "scripted" and doc["model"] == "llama-3.1-8b"
    assert doc["slo"]["ttft_p99_ms"] == pytest.approx(60.0)
    assert doc["reference"]["serving_alone"]["serving"]["ttft"]["p99_ms"] == pytest.approx(30.0)
    assert doc["reference"]["trainer_alone"]["peft"]["samples_per_s"] == 3.0
    assert doc["best"]["params"] == {"mps_active_thread_pct": 60}
    assert doc["best"]["metrics"]["peft"]["samples_per_s"] == pytest.approx(1.8)
    assert len(doc["trials"]) == 19
    assert {"number", "state", "params", "metrics", "constraints"} <= set(doc["trials"][0])


def test_no_feasible_setting(tmp_path):
    ctx = run_study(_config(tmp_path, slo=SloSpec(ttft_p99_ms=10.0, tpot_p99_ms=5.0)), ScriptedBackend(), 3)
    result = StudyResult.of(ctx.study)
    assert result.best is None
    from autotune.results import summary_text

    assert "no setting meets the SLO; PEFT throughput counts as 0" in summary_text(result)
    assert result.to_dict()["best"] is None


class FlakyReference(ScriptedBackend):
    """Serving alone fails the first time it is asked, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_once = False

    def run_trial(self, spec, progress=lambda f, s: None):
        if spec.kind is TrialKind.SERVING_ALONE and not self.failed_once:
            self.failed_once = True
            self.calls.append(spec)
            return TrialResult.crash("server died")
        return super().run_trial(spec, progress)


def test_a_failed_reference_is_an_error_and_is_made_again_next_time(tmp_path):
    backend = FlakyReference()
    with pytest.raises(UserError, match="serving-alone reference run failed \\(server died\\)"):
        run_study(_config(tmp_path, sampler="random"), backend, n_trials=1)
    ctx = run_study(_config(tmp_path, sampler="random"), backend, n_trials=1)
    assert ctx.slo.ttft_p99_ms == pytest.approx(60.0)
    assert sum(s.kind is TrialKind.SERVING_ALONE for s in backend.calls) == 2


# ---------------------------------------------------------------- --objective pareto


def test_a_pareto_study_has_three_objectives_and_its_feasible_front(tmp_path):
    ctx = run_study(_config(tmp_path, objective="pareto"), ScriptedBackend(), n_trials=25)
    study = ctx.study
    assert study.study_name == "vllm-torchtune-fig8a-2rps-pareto-scripted"
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    by_pct = {t.params["mps_active_thread_pct"]: t for t in study.trials}
    assert by_pct[60].values == pytest.approx([1.8, 59.0, 8.0])  # PEFT 3p/100, TTFT 29 + p/2 ms, TPOT 8 ms
    assert by_pct[35].values == pytest.approx([0.0, 60.0 * (1 + CRASH_VIOLATION), 12.0 * (1 + CRASH_VIOLATION)])
    result = StudyResult.of(study)
    # TTFT rises with PEFT and TPOT is flat: every feasible setting (p <= 60,
    # not the crash at 35) trades one for the other; p = 65 .. 100 miss the TTFT limit.
    assert sorted(r.params["mps_active_thread_pct"] for r in result.pareto_optimal) == \
        [p for p in range(10, 61, 5) if p != 35]
    assert [r.peft_samples_per_s for r in result.pareto_optimal] == \
        sorted((r.peft_samples_per_s for r in result.pareto_optimal), reverse=True)
    doc = result.to_dict()
    assert doc["objective"] == "pareto" and doc["best"]["params"] == {"mps_active_thread_pct": 60}
    assert [t["number"] for t in doc["pareto_optimal"]] == [r.number for r in result.pareto_optimal]
    assert all(t["feasible"] for t in doc["pareto_optimal"])


def test_a_pareto_study_with_no_feasible_trial_has_an_empty_front(tmp_path):
    slo = SloSpec(ttft_p99_ms=1.0, tpot_p99_ms=1.0)
    ctx = run_study(_config(tmp_path, objective="pareto", slo=slo), ScriptedBackend(), n_trials=3)
    result = StudyResult.of(ctx.study)
    assert result.pareto_optimal == [] and result.to_dict()["pareto_optimal"] == []
    assert result.best is None


@pytest.mark.parametrize("first, then", [("peft", "pareto"), ("pareto", "peft")])
def test_resume_with_another_objective_is_refused(tmp_path, first, then):
    run_study(_config(tmp_path, objective=first, study_name="s"), ScriptedBackend(), n_trials=1)
    with pytest.raises(UserError, match=r"exists with other settings \(objective\)"):
        run_study(_config(tmp_path, objective=then, study_name="s"), ScriptedBackend(), n_trials=1)


def test_pareto_needs_serving_and_a_known_objective(tmp_path):
    with pytest.raises(UserError, match="fig12 serves nothing"):
        run_study(_config(tmp_path, system="llmstation", figure="fig12", objective="pareto"), ScriptedBackend(), 1)
    with pytest.raises(UserError, match="unknown objective 'fast'"):
        run_study(_config(tmp_path, objective="fast"), ScriptedBackend(), 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_pareto_study_past_its_random_start(tmp_path, sampler):
    ctx = run_study(_config(tmp_path, objective="pareto", sampler=sampler, slo=SloSpec(ttft_p99_ms=70.0,
                                                                                         tpot_p99_ms=12.0)),
                    ScriptedBackend(crash_at=None), n_trials=N_STARTUP_TRIALS + 2)
    trials = ctx.study.trials
    assert len(trials) == N_STARTUP_TRIALS + 2 and all(len(t.values) == 3 for t in trials)
    assert StudyResult.of(ctx.study).pareto_optimal  # the artifact's p = 80 misses 70 ms; others meet it


def test_settings_run_once_each_and_a_resume_adds_none(tmp_path):
    settings = ({"mps_active_thread_pct": 20}, {"mps_active_thread_pct": 45})
    backend = ScriptedBackend()
    ctx = run_study(_config(tmp_path, sampler="tpe", settings=settings), backend, n_trials=2)
    assert [t.params for t in ctx.study.trials] == list(settings)  # not the artifact's 80 first
    again = ScriptedBackend()
    ctx = run_study(_config(tmp_path, sampler="tpe", settings=settings), again, n_trials=0)
    assert len(ctx.study.trials) == 2 and enqueue_settings(ctx) == 0


def test_a_setting_interrupted_is_queued_again_and_a_queued_one_is_not_doubled(tmp_path):
    settings = tuple({"mps_active_thread_pct": p} for p in (20, 30, 40))
    with pytest.raises(KeyboardInterrupt):  # at 30: trial 1 FAIL, 40 still queued
        run_study(_config(tmp_path, settings=settings), ScriptedBackend(interrupt_at=30), n_trials=3)
    ctx = run_study(_config(tmp_path, settings=settings), ScriptedBackend(), n_trials=2)
    done = [t.params["mps_active_thread_pct"] for t in ctx.study.trials if t.state.name == "COMPLETE"]
    assert sorted(done) == [20, 30, 40] and enqueue_settings(ctx) == 0


def test_a_study_stored_by_an_earlier_version_resumes_and_reads(tmp_path):
    """Before metrics were nested and the search space kept as data, a study
    stored flat metrics, each knob's range as [low, high, step, log] in its
    identity, the range as display text in its config, and references with
    flat metrics: such a study resumes (same identity), keeps its SLO, and its
    trials read back with their numbers."""
    ctx = run_study(_config(tmp_path), ScriptedBackend(), n_trials=2)
    study, attrs = ctx.study, ctx.study.user_attrs
    identity = {**attrs["identity"], "search_space": {k: [v["low"], v["high"], v["step"], v["log"]]
                                                      for k, v in attrs["identity"]["search_space"].items()}}
    old = optuna.create_study(study_name="old", storage=ctx.storage, direction="maximize")
    old.set_user_attr("identity", identity)
    old.set_user_attr("config", {**attrs["config"], "search_space": {"mps_active_thread_pct": "10–100 %, step 5"}})
    old.set_user_attr("slo", attrs["slo"])
    flat_refs = {kind: {"metrics": reference_metrics(r).flat(), "error": None,
                        "result": {"serving": None, "error": None}} for kind, r in attrs["references"].items()}
    old.set_user_attr("references", flat_refs)
    for t in study.trials:
        old.add_trial(optuna.trial.create_trial(
            state=t.state, value=t.value, params=t.params, distributions=t.distributions, constraints=t.constraints,
            user_attrs={**t.user_attrs, "metrics": TrialRow.of(t).metrics.flat()}))

    resumed = run_study(_config(tmp_path, study_name="old"), ScriptedBackend(), n_trials=2)
    assert len(resumed.study.trials) == 4 and resumed.slo == ctx.slo
    result = StudyResult.of(resumed.study)
    before = StudyResult.of(study)
    assert [r.metrics.ttft_p99_ms for r in result.rows[:2]] == [r.metrics.ttft_p99_ms for r in before.rows]
    assert [r.peft_samples_per_s for r in result.rows[:2]] == [r.peft_samples_per_s for r in before.rows]
    assert result.trainer_alone_samples_per_s == before.trainer_alone_samples_per_s == 3.0
    # its range, as data, from the identity (unit, type and default were not kept)
    assert result.search_space == {"mps_active_thread_pct": {"low": 10, "high": 100, "step": 5, "log": False}}
    assert before.search_space == {"mps_active_thread_pct": {"type": "int", "unit": "%", "low": 10, "high": 100,
                                                             "step": 5, "log": False, "default": 80}}
