"""Confirmation: the best feasible settings re-run on fresh workloads, in
order, stopping at the first that holds; stored on the study and resumed."""

from __future__ import annotations

import json

import pytest

from autotune.confirm import SEED_OFFSET, Confirmation, verdict, workload_seeds
from autotune.errors import UserError
from autotune.metrics import serving_metrics
from autotune.results import StudyResult, summary_text, write_json
from autotune.study import StudyConfig, run_study
from autotune.trial import Outcome, TrialResult

from tests.test_study import RELATIVE_SLO, ScriptedBackend


class FreshTrafficBackend(ScriptedBackend):
    """ScriptedBackend (feasible up to 60 % under a 2x TTFT SLO; PEFT grows
    with the %), plus fresh-workload behaviour: at 60 % the first fresh
    workload breaks the TTFT limit; with ``crash_confirmations`` every
    confirmation run crashes."""

    def __init__(self, crash_confirmations: bool = False) -> None:
        super().__init__(crash_at=None)
        self.crash_confirmations = crash_confirmations

    def confirmations(self) -> list[tuple[int, int]]:
        """(thread %, workload seed) of each confirmation run so far."""
        return [(s.params["mps_active_thread_pct"], s.seed) for s in self.calls if (s.label or "").startswith("confirm")]

    def run_trial(self, spec, progress=lambda f, s: None):
        if (spec.label or "").startswith("confirm"):
            if self.crash_confirmations:
                self.calls.append(spec)
                return TrialResult.crash("vLLM server died during the trial")
            if spec.params["mps_active_thread_pct"] == 60 and spec.seed == SEED_OFFSET + 1:
                self.calls.append(spec)
                late = serving_metrics(self._records(spec, ttft_s=0.070, tpot_s=0.008))  # 70 ms > 60 ms limit
                return TrialResult(serving=late, peft=None)
        return super().run_trial(spec, progress)


def _config(tmp_path, **kw) -> StudyConfig:
    base = dict(system="vllm-torchtune", figure="fig8a", rate_req_s=2.0, num_prompts=20, sampler="grid",
                runs_dir=tmp_path, seed=0, confirm_workloads=2, slo=RELATIVE_SLO)
    base.update(kw)
    return StudyConfig(**base)


def _pct(row) -> int:
    return row.params["mps_active_thread_pct"]


def test_verdict():
    ok1, ok2 = Confirmation(1, Outcome.FEASIBLE), Confirmation(2, Outcome.FEASIBLE)
    miss2, miss3 = Confirmation(2, Outcome.INFEASIBLE), Confirmation(3, Outcome.INFEASIBLE)
    assert verdict([], [1, 2]) is None and verdict([ok1], [1, 2]) is None
    assert verdict([ok1, ok2], [1, 2]) is True
    assert verdict([miss2], [1, 2]) is False and verdict([ok1, miss2], [1, 2]) is False
    assert verdict([ok1, ok2, miss3], [1, 2]) is True  # a miss on a workload no longer asked for
    assert verdict([Confirmation(1, Outcome.CRASHED, error="x")], [1]) is False


def test_recommends_the_best_setting_that_holds_on_fresh_workloads(tmp_path):
    backend = FreshTrafficBackend()
    ctx = run_study(_config(tmp_path), backend, n_trials=19)
    result = StudyResult.of(ctx.study)
    assert _pct(result.best) == 60
    # 60 % misses on the first fresh workload and is not run on the second;
    # 55 % holds on both; 50 % is never run.
    assert backend.confirmations() == [(60, SEED_OFFSET + 1), (55, SEED_OFFSET + 1), (55, SEED_OFFSET + 2)]
    assert result.confirmed(result.best) is False
    assert _pct(result.recommended) == 55 and result.confirmed(result.recommended) is True
    text = summary_text(result)
    assert "confirmation on 2 fresh workloads" in text and "recommended (trial" in text
    assert "missed" in text and "confirmed" in text


def test_fresh_workloads_differ_from_the_studys_and_keep_its_length(tmp_path):
    backend = FreshTrafficBackend()
    ctx = run_study(_config(tmp_path), backend, n_trials=19)
    confirm_specs = [s for s in backend.calls if (s.label or "").startswith("confirm")]
    assert {s.seed for s in confirm_specs} == set(workload_seeds(0, 2))
    for s in confirm_specs:
        assert len(s.workload) == len(ctx.workload)
        assert s.workload.requests != ctx.workload.requests
        assert s.number is None  # not a trial of the study: its log folder is named by the label
    assert len(ctx.study.trials) == 19  # confirmations add no trials


def test_resumed_study_reruns_nothing_and_more_workloads_run_only_what_is_missing(tmp_path):
    run_study(_config(tmp_path, confirm_workloads=1), FreshTrafficBackend(), n_trials=19)
    again = FreshTrafficBackend()
    run_study(_config(tmp_path, confirm_workloads=1), again, n_trials=1)  # grid exhausted: no new trial
    assert again.confirmations() == []
    more = FreshTrafficBackend()
    ctx = run_study(_config(tmp_path, confirm_workloads=2), more, n_trials=1)
    assert more.confirmations() == [(55, SEED_OFFSET + 2)]  # 60 % already missed; 55 % needed a second
    assert _pct(StudyResult.of(ctx.study).recommended) == 55


def test_a_setting_tried_twice_is_confirmed_once(tmp_path):
    space = tmp_path / "two.toml"
    space.write_text("[mps_active_thread_pct]\nlow = 55\nhigh = 60\nstep = 5\n")
    backend = FreshTrafficBackend()
    ctx = run_study(_config(tmp_path, sampler="random", search_space_path=space), backend, n_trials=6)
    result = StudyResult.of(ctx.study)
    assert len({_pct(r) for r in result.rows}) == 2  # 6 trials over 2 settings: repeats
    assert backend.confirmations() == [(60, SEED_OFFSET + 1), (55, SEED_OFFSET + 1), (55, SEED_OFFSET + 2)]
    assert all(result.confirmed(r) is (_pct(r) == 55) for r in result.rows if r.feasible)
    assert _pct(result.recommended) == 55


def test_crashed_confirmations_count_as_misses(tmp_path):
    backend = FreshTrafficBackend(crash_confirmations=True)
    ctx = run_study(_config(tmp_path), backend, n_trials=19)
    result = StudyResult.of(ctx.study)
    assert [p for p, _ in backend.confirmations()] == [60, 55, 50]  # 3 candidates, one run each
    assert result.best is not None and result.recommended is None
    assert "no setting met the SLO on all 2 fresh workloads" in summary_text(result)
    write_json(result, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["best"]["confirmed"] is False
    assert data["confirmation"]["recommended"] is None
    runs = data["confirmation"]["runs"]
    assert all(r[0]["outcome"] == "crashed" and "server died" in r[0]["error"] for r in runs.values())


def test_without_confirmation_the_answer_is_the_best(tmp_path):
    backend = FreshTrafficBackend()
    ctx = run_study(_config(tmp_path, confirm_workloads=0), backend, n_trials=19)
    result = StudyResult.of(ctx.study)
    assert backend.confirmations() == []
    assert result.recommended == result.best and result.confirmed(result.best) is None
    write_json(result, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["confirmation"] is None and data["best"]["confirmed"] is None


@pytest.mark.parametrize("kw, match", [
    ({"confirm_workloads": -1}, "--confirm must be >= 0"),
    ({"figure": "fig12", "rate_req_s": None, "num_prompts": None, "system": "llmstation"}, "serves nothing"),
])
def test_bad_confirm_options(tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        run_study(_config(tmp_path, **kw), FreshTrafficBackend(), n_trials=1)
