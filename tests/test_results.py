"""Results rebuilt from a study: rows, best, Pareto front, JSON, summary."""

from __future__ import annotations

import errno
import json
import math
import pathlib

import optuna
import pytest

from autotune.errors import UserError
from autotune.results import (
    SCHEMA_VERSION,
    StudyResult,
    TrialRow,
    format_params,
    load_result,
    schema,
    summary_text,
    tradeoff_curve,
    write_json,
)
from autotune.metrics import TrialMetrics
from autotune.trial import Outcome
from autotune.slo import CRASH_VIOLATION
from autotune.testing.records import made_up_metrics

PCT = optuna.distributions.IntDistribution(10, 100, step=5)
SLO = {"ttft_p99_ms": 60.0, "tpot_p99_ms": 12.0, "ttft_basis": "absolute", "tpot_basis": "absolute"}
CONFIG = {"system": "vllm-torchtune", "figure": "fig8a", "rate_req_s": 2.0, "model": "llama-3.1-8b",
          "backend": {"backend": "sim", "hardware": "h100-80gb"}}


def _finished(pct: int, outcome: str, peft: float, ttft_ms: float, *, error: str | None = None):
    if outcome == "crashed":
        metrics, margins = made_up_metrics(wall_s=0.5), {"ttft_p99": CRASH_VIOLATION, "tpot_p99": CRASH_VIOLATION}
    else:
        metrics = made_up_metrics(peft, ttft_ms, 8.0)
        margins = {"ttft_p99": ttft_ms / 60.0 - 1.0, "tpot_p99": 8.0 / 12.0 - 1.0}
    attrs = {"metrics": metrics.to_dict(), "outcome": outcome}
    if error:
        attrs["error"] = error
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=0.0 if outcome == "crashed" else peft,
        params={"mps_active_thread_pct": pct}, distributions={"mps_active_thread_pct": PCT},
        user_attrs=attrs, constraints=margins,
    )


@pytest.fixture
def study() -> optuna.Study:
    """Trials 0-3 finished (feasible, infeasible, crashed, feasible), trial 4 running."""
    s = optuna.create_study(direction="maximize", study_name="s")
    s.set_user_attr("config", CONFIG)
    s.set_user_attr("slo", SLO)
    s.set_user_attr("references", {"trainer_alone": {"metrics": made_up_metrics(3.0).to_dict()}})
    s.add_trial(_finished(60, "feasible", 1.8, 59.0))
    s.add_trial(_finished(80, "infeasible", 2.4, 69.0))
    s.add_trial(_finished(35, "crashed", 0.0, 0.0, error="trainer out of memory"))
    s.add_trial(_finished(50, "feasible", 1.5, 54.0))
    s.ask()  # running, nothing suggested yet
    return s


def test_rows_of_frozen_trials(study):
    rows = StudyResult.of(study).rows
    assert [r.number for r in rows] == [0, 1, 2, 3, 4]
    assert [r.outcome for r in rows] == ["feasible", "infeasible", "crashed", "feasible", "running"]
    assert [r.state for r in rows] == ["COMPLETE"] * 4 + ["RUNNING"]
    assert [r.feasible for r in rows] == [True, False, False, True, False]
    feasible, infeasible, crashed, _, running = rows
    assert feasible.params == {"mps_active_thread_pct": 60}
    assert feasible.peft_samples_per_s == 1.8
    assert feasible.constraints == pytest.approx({"ttft_p99": 59 / 60 - 1, "tpot_p99": 8 / 12 - 1})
    assert infeasible.constraints["ttft_p99"] == pytest.approx(0.15)
    assert crashed.constraints == {"ttft_p99": CRASH_VIOLATION, "tpot_p99": CRASH_VIOLATION}
    assert crashed.error == "trainer out of memory" and crashed.peft_samples_per_s == 0.0
    assert running.params == {} and running.metrics == TrialMetrics() and running.constraints == {}


def test_a_failed_trial_without_outcome_is_failed():
    t = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
    row = TrialRow.of(t)
    assert (row.state, row.outcome, row.feasible) == ("FAIL", "failed", False)


def test_a_failed_trial_that_measured_feasible_is_failed():
    # stopped between storing its outcome and being marked COMPLETE
    t = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"outcome": "feasible"})
    assert (TrialRow.of(t).outcome, TrialRow.of(t).feasible) == ("failed", False)


def test_best_is_the_highest_feasible_throughput(study):
    result = StudyResult.of(study)
    assert result.best.number == 0  # trial 1 is faster but infeasible


def _row(number: int, peft: float, tpot_ms: float, outcome: str = "feasible") -> TrialRow:
    return TrialRow(number, "COMPLETE", outcome, {"k": number}, made_up_metrics(peft, 50.0, tpot_ms), {})


def test_best_ties_go_to_the_lowest_number():
    rows = (_row(3, 2.0, 9.0), _row(1, 2.0, 9.5), _row(2, 2.0, 8.0), _row(0, 1.0, 5.0))
    assert StudyResult("s", {}, None, {}, rows).best.number == 1


def test_best_is_none_without_a_feasible_row():
    rows = (_row(0, 2.0, 9.0, "infeasible"), _row(1, 3.0, 9.0, "crashed"))
    assert StudyResult("s", {}, None, {}, rows).best is None


def test_tradeoff_curve_of_known_points():
    rows = [
        _row(0, 1.0, 5.0),  # front: the lowest latency
        _row(1, 2.0, 6.0),  # front
        _row(2, 1.5, 7.0),  # dominated by 1
        _row(3, 3.0, 9.0, "infeasible"),  # front: infeasible points belong to the trade-off curve
        _row(4, 3.0, 9.5),  # dominated by 3 (same throughput, higher latency)
        _row(5, 2.0, 6.0),  # equal to 1: neither dominates, both stay
        _row(6, 9.0, 1.0, "crashed"),  # would dominate all, but crashed rows are left out
        _row(7, 9.0, 1.0, "running"),
    ]
    front = tradeoff_curve(rows)
    assert [r.number for r in front] == [0, 1, 5, 3]  # sorted by throughput
    assert [r.peft_samples_per_s for r in front] == [1.0, 2.0, 2.0, 3.0]


def test_tradeoff_curve_skips_rows_without_the_metrics():
    rows = [_row(0, 1.0, 5.0), TrialRow(1, "COMPLETE", "feasible", {}, made_up_metrics(5.0), {})]
    assert [r.number for r in tradeoff_curve(rows)] == [0]
    assert tradeoff_curve([]) == []


def test_tradeoff_curve_on_another_latency():
    rows = [TrialRow(i, "COMPLETE", "feasible", {}, made_up_metrics(p, t, 8.0), {})
            for i, (p, t) in enumerate([(1.0, 50.0), (2.0, 40.0), (3.0, 70.0)])]
    assert [r.number for r in tradeoff_curve(rows, latency="ttft_p99_ms")] == [1, 2]


def test_to_dict_and_write_json(study, tmp_path):
    path = tmp_path / "out.json"
    write_json(StudyResult.of(study), path)
    doc = json.loads(path.read_text())
    assert (doc["system"], doc["figure"], doc["rate_req_s"], doc["backend"], doc["model"]) == (
        "vllm-torchtune", "fig8a", 2.0, "sim", "llama-3.1-8b")
    assert doc["slo"]["ttft_p99_ms"] == 60.0 and doc["slo"]["tpot_p99_ms"] == 12.0
    assert doc["reference"] == {"trainer_alone": made_up_metrics(3.0).to_dict()}
    assert doc["best"] == {"number": 0, "params": {"mps_active_thread_pct": 60},
                           "metrics": made_up_metrics(1.8, 59.0, 8.0).to_dict(), "feasible": True, "confirmed": None}
    best = doc["best"]["metrics"]  # nested: serving (a latency summary per metric), PEFT, backend extras apart
    assert (best["serving"]["ttft"]["p99_ms"], best["serving"]["tpot"]["p99_ms"], best["peft"]["samples_per_s"]) == (
        59.0, 8.0, 1.8)
    assert doc["confirmation"] is None  # never asked for
    assert [t["number"] for t in doc["trials"]] == [0, 1, 2, 3, 4]
    assert doc["trials"][2]["error"] == "trainer out of memory"
    assert not list(tmp_path.glob(".*.tmp"))


def _validator():
    jsonschema = pytest.importorskip("jsonschema")  # in the test extra: runs in CI
    return jsonschema, jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())


def test_written_json_follows_its_schema_and_says_when_and_by_what(study, tmp_path):
    jsonschema, validator = _validator()
    path = tmp_path / "out.json"
    write_json(StudyResult.of(study), path)
    doc = json.loads(path.read_text())
    validator.validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION == schema()["properties"]["schema_version"]["const"]
    assert doc["written_at"].endswith("+00:00") and doc["versions"]["optuna"] == optuna.__version__
    assert doc["hardware"] == "h100-80gb" and doc["server_flags"] is None  # the simulator runs no server
    assert [t["outcome"] for t in doc["trials"]] == ["feasible", "infeasible", "crashed", "feasible", "running"]
    for broken in ({**doc, "trials": [{**doc["trials"][0], "outcome": "great"}]},  # not an outcome
                   {k: v for k, v in doc.items() if k != "versions"},
                   {**doc, "schema_version": 1},
                   {**doc, "trials": [{**doc["trials"][0], "ttft_p99_ms": 1.0}]},  # metrics belong in metrics
                   {**doc, "trials": [{**doc["trials"][0], "metrics": {"ttft_p99_ms": 1.0}}]}):  # nested, not flat
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


def test_the_cli_json_of_a_simulated_study_follows_the_schema(tmp_path):
    from typer.testing import CliRunner

    from autotune.cli import app

    _, validator = _validator()
    out = tmp_path / "study.json"
    result = CliRunner().invoke(app, ["chunked", "--figure", "fig8a", "--trials", "2", "--num-prompts", "10",
                                      "--plain", "--runs-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    validator.validate(json.loads(out.read_text()))


def test_outcomes_are_read_as_the_enum():
    row = TrialRow.of(_finished(60, "infeasible", 1.0, 70.0))
    assert row.outcome is Outcome.INFEASIBLE and not row.feasible


def test_write_json_writes_null_for_inf_and_nan(tmp_path):
    row = TrialRow(0, "COMPLETE", "infeasible", {"k": 1.0}, made_up_metrics(1.0, math.nan, math.inf), {"x": math.inf})
    path = tmp_path / "out.json"
    write_json(StudyResult("s", {}, None, {}, (row,)), path)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    trial = json.loads(text)["trials"][0]
    serving = trial["metrics"]["serving"]
    assert (trial["metrics"]["peft"]["samples_per_s"], serving["tpot"]["p99_ms"], serving["ttft"]["p99_ms"]) == (
        1.0, None, None)
    assert trial["constraints"] == {"x": None}


def test_a_failing_write_leaves_the_old_file_intact(study, tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text('{"old": true}\n')
    real_write_text = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):  # half the text, then ENOSPC
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*out\.json: No space left on device"):
        write_json(StudyResult.of(study), path)
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_write_json_into_a_missing_folder_is_a_user_error(study, tmp_path):
    with pytest.raises(UserError, match=r"cannot write .*nodir/out\.json: No such file or directory"):
        write_json(StudyResult.of(study), tmp_path / "nodir" / "out.json")


def test_summary_without_a_feasible_setting():
    rows = (_row(0, 2.0, 9.0, "infeasible"), _row(1, 0.0, 0.0, "crashed"))
    text = summary_text(StudyResult("s", CONFIG, SLO, {}, rows))
    lines = text.splitlines()
    assert lines[0] == "study s: 2 trials (vllm-torchtune, fig8a, 2 req/s, sim backend)"
    assert lines[1] == "SLO: P99 TTFT <= 60.0 ms (absolute), P99 TPOT <= 12.00 ms (absolute)"
    assert lines[2] == "no setting meets the SLO; PEFT throughput counts as 0"
    assert len(lines) == 3


def test_summary_with_the_best_setting(study):
    lines = summary_text(StudyResult.of(study)).splitlines()
    assert lines[2] == "best (trial 0): mps_active_thread_pct=60"
    assert lines[3].startswith("  PEFT 1.800 samples/s") and "P99 TTFT 59.0 ms, P99 TPOT 8.00 ms" in lines[3]
    assert lines[4] == "  = 60% of the trainer alone (3.000 samples/s)"


def test_format_params():
    assert format_params({"a": 8, "b": 0.005, "c": 32.0, "d": 0.123456}) == "a=8, b=0.005, c=32, d=0.1235"


def test_load_result(tmp_path, study):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    stored = optuna.create_study(study_name="mine", storage=url, direction="maximize")
    stored.set_user_attr("config", CONFIG)
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        stored.add_trial(t)
    result = load_result(url, "mine")
    assert result.study_name == "mine" and len(result.rows) == 4 and result.best.number == 0
    with pytest.raises(UserError, match="no study named 'other'"):
        load_result(url, "other")
