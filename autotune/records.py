"""A study's stored records, as typed objects: a trial read back from
Optuna (``TrialRow``) and a confirmation re-run (``Confirmation``, kept on the
study as user attributes), with the rules that read them.

The confirmation runner (``autotune.confirm``) writes these records; the
results (``autotune.results``), the live table and the notebooks read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from autotune.metrics import TrialMetrics
from autotune.slo import ResolvedSlo, constraint_margins, feasible
from autotune.trial import Outcome, TrialResult


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # Optuna's: COMPLETE, FAIL, RUNNING, ...
    outcome: Outcome
    params: dict[str, float]
    metrics: TrialMetrics
    constraints: dict[str, float]  # signed relative margins, <= 0 met
    error: str | None = None

    @property
    def feasible(self) -> bool:
        return self.outcome == Outcome.FEASIBLE

    @property
    def measured(self) -> bool:
        """Measured whole (feasible or not): neither crashed, failed nor in flight."""
        return self.outcome in (Outcome.FEASIBLE, Outcome.INFEASIBLE)

    @property
    def peft_samples_per_s(self) -> float:
        """0 where the trial measured none (it crashed, or failed)."""
        return self.metrics.peft_samples_per_s or 0.0

    @classmethod
    def of(cls, t: optuna.trial.FrozenTrial) -> TrialRow:
        constraints = {k: float(v) for k, v in t.constraints.items()}  # Optuna 5: set_constraint's
        if t.state == optuna.trial.TrialState.RUNNING:
            outcome = Outcome.RUNNING
        else:
            outcome = Outcome(t.user_attrs.get("outcome", Outcome.FAILED))
            if t.state == optuna.trial.TrialState.FAIL and outcome not in (Outcome.INTERRUPTED, Outcome.FAILED):
                outcome = Outcome.FAILED  # measured, but not stored whole: never counted feasible
        return cls(
            number=t.number,
            state=t.state.name,
            outcome=outcome,
            params=dict(t.params),
            metrics=TrialMetrics.from_dict(t.user_attrs.get("metrics", {})),
            constraints=constraints,
            error=t.user_attrs.get("error"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state,
            "outcome": str(self.outcome),
            "params": self.params,
            "metrics": self.metrics.to_dict(),
            "constraints": self.constraints,
            "error": self.error,
        }


def outcome_of(result: TrialResult, margins: Mapping[str, float]) -> Outcome:
    """How a measured run ended: crashed, or feasible or not by its constraint margins."""
    if result.crashed:
        return Outcome.CRASHED
    return Outcome.FEASIBLE if feasible(margins) else Outcome.INFEASIBLE


#: Distinct settings tried, at most, before giving up.
CANDIDATES = 3
#: Study user attributes: the records, and the workload seeds of the latest request.
CONFIRMATIONS_ATTR = "confirmations"
CONFIRM_SEEDS_ATTR = "confirm_workload_seeds"


@dataclass(frozen=True)
class Confirmation:
    """One re-run of a trial's setting on a fresh workload."""

    workload_seed: int
    outcome: Outcome  # FEASIBLE, INFEASIBLE or CRASHED
    metrics: TrialMetrics = field(default_factory=TrialMetrics)
    constraints: dict[str, float] = field(default_factory=dict)  # signed margins, <= 0 met
    error: str | None = None

    @property
    def feasible(self) -> bool:
        return self.outcome == Outcome.FEASIBLE

    @classmethod
    def of(cls, result: TrialResult, slo: ResolvedSlo, workload_seed: int) -> Confirmation:
        margins = constraint_margins(result, slo)
        return cls(workload_seed, outcome_of(result, margins), result.measured(), margins, result.error)

    def measured_text(self) -> str:
        """What the re-run measured, e.g. ``P99 TTFT 50.0 ms, P99 TPOT 8.00 ms, 1.500 samples/s``."""
        if self.error is not None:
            return f"crashed: {self.error}"
        m = self.metrics
        nan = float("nan")
        return (f"P99 TTFT {m.ttft_p99_ms if m.ttft_p99_ms is not None else nan:.1f} ms, "
                f"P99 TPOT {m.tpot_p99_ms if m.tpot_p99_ms is not None else nan:.2f} ms, "
                f"{m.peft_samples_per_s or 0:.3f} samples/s")

    def to_dict(self) -> dict[str, Any]:
        return {"workload_seed": self.workload_seed, "outcome": str(self.outcome), "metrics": self.metrics.to_dict(),
                "constraints": self.constraints, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Confirmation:
        return cls(int(d["workload_seed"]), Outcome(d["outcome"]), TrialMetrics.from_dict(d.get("metrics", {})),
                   dict(d.get("constraints", {})), d.get("error"))


#: What of a knob's range is part of a study's identity (a resume with another range is another study).
RANGE_IDENTITY = ("low", "high", "step", "log")


def migrate_identity(identity: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored identity in today's form: studies made before the search
    space was stored as data kept each knob's range as ``[low, high, step,
    log]``. The stored attribute itself is left as it is."""
    if identity is None:
        return None
    space = identity.get("search_space")
    if not isinstance(space, Mapping):
        return dict(identity)
    return {**identity, "search_space": {k: dict(zip(RANGE_IDENTITY, v)) if isinstance(v, list) else v
                                         for k, v in space.items()}}


def search_space_record(user_attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """A study's search space as data: knob -> {type, unit, low, high, step,
    log, default}. Studies made before it was stored so kept it as display
    text; theirs comes from the identity (its range only). None: never stored."""
    space = (user_attrs.get("config") or {}).get("search_space")
    if isinstance(space, Mapping) and all(isinstance(v, Mapping) for v in space.values()):
        return {k: dict(v) for k, v in space.items()}
    identity = migrate_identity(user_attrs.get("identity")) or {}
    ranges = identity.get("search_space")
    return {k: dict(v) for k, v in ranges.items()} if isinstance(ranges, Mapping) else None


def reference_metrics(record: Mapping[str, Any]) -> TrialMetrics:
    """A reference run's metrics, as stored with a study or in the runs
    folder's cache (nested, or flat as earlier versions stored them)."""
    return TrialMetrics.from_dict(record.get("metrics") or {})


def load_confirmations(user_attrs: Mapping[str, Any]) -> dict[int, list[Confirmation]]:
    """The stored confirmations, by trial number."""
    return {int(k): [Confirmation.from_dict(c) for c in v] for k, v in user_attrs.get(CONFIRMATIONS_ATTR, {}).items()}


def setting_records(rows: Sequence[TrialRow], stored: Mapping[int, Sequence[Confirmation]],
                    params: Mapping[str, float]) -> list[Confirmation]:
    """Every confirmation of one setting: trials that repeat a setting share them."""
    return [c for r in rows if r.params == params for c in stored.get(r.number, [])]


def verdict(records: Sequence[Confirmation], seeds: Sequence[int]) -> bool | None:
    """True: met the SLO on the fresh workloads of all ``seeds``; False: missed
    on one of them; None: not run on all of them yet."""
    relevant = [c for c in records if c.workload_seed in seeds]
    if any(not c.feasible for c in relevant):
        return False
    return True if {c.workload_seed for c in relevant} >= set(seeds) else None
