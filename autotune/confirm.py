"""Confirmation: the best feasible settings run again on traffic the study never saw.

Every trial of a study replays the same workload, so trials compare fairly;
but a P99 over one workload is decided by its few slowest requests. Where the
SLO binds inside the band that workload details alone move P99 by, the best
feasible trial is partly luck: on the simulator, under 1.25x/1.1x SLOs, the
optimum of a dense grid met the SLO on only some of four fresh workloads
(``benchmarks/results/search_quality.md``, held-out check).

``confirm`` re-runs the best feasible settings (distinct knob values, in
order of PEFT throughput) on ``n`` fresh workloads: the study's figure, rate
and length drawn with other seeds; the SLO stays the same in ms. A setting is
confirmed when it meets the SLO on all of them; the first confirmed one is the
recommendation, and no lower setting is run. A setting that misses on one
workload is not run on the rest. Results are stored on the study (user attr ``confirmations``) as
they arrive, so a resumed study re-runs nothing, and the study alone still
rebuilds every table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.slo import ResolvedSlo, constraint_margins, feasible
from autotune.trial import TrialKind, TrialResult, TrialSpec

if TYPE_CHECKING:  # the study and results modules import this one
    from autotune.results import TrialRow
    from autotune.study import StudyContext, StudyObserver

#: Distinct settings tried, at most, before giving up.
CANDIDATES = 3
#: Fresh workloads use seeds ``study seed + SEED_OFFSET + 1 .. n``: far from the
#: study's own seed and from the small seeds users pick for other studies.
SEED_OFFSET = 1_000_000
#: Study user attributes: the records, and the workload seeds of the latest request.
ATTR = "confirmations"
ATTR_SEEDS = "confirm_workload_seeds"


@dataclass(frozen=True)
class Confirmation:
    """One re-run of a trial's setting on a fresh workload."""

    workload_seed: int
    outcome: str  # feasible | infeasible | crashed
    metrics: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)  # signed margins, <= 0 met
    error: str | None = None

    @property
    def feasible(self) -> bool:
        return self.outcome == "feasible"

    @classmethod
    def of(cls, result: TrialResult, slo: ResolvedSlo, workload_seed: int) -> Confirmation:
        margins = constraint_margins(result, slo)
        outcome = "crashed" if result.crashed else ("feasible" if feasible(margins) else "infeasible")
        return cls(workload_seed, outcome, result.metrics(), margins, result.error)

    def measured_text(self) -> str:
        """What the re-run measured, e.g. ``P99 TTFT 50.0 ms, P99 TPOT 8.00 ms, 1.500 samples/s``."""
        if self.error is not None:
            return f"crashed: {self.error}"
        m = self.metrics
        return (f"P99 TTFT {m.get('ttft_p99_ms', float('nan')):.1f} ms, P99 TPOT {m.get('tpot_p99_ms', float('nan')):.2f} ms, "
                f"{m.get('peft_samples_per_s', 0):.3f} samples/s")

    def to_dict(self) -> dict[str, Any]:
        return {"workload_seed": self.workload_seed, "outcome": self.outcome, "metrics": self.metrics,
                "constraints": self.constraints, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Confirmation:
        return cls(int(d["workload_seed"]), str(d["outcome"]), dict(d.get("metrics", {})),
                   dict(d.get("constraints", {})), d.get("error"))


def workload_seeds(study_seed: int, n: int) -> list[int]:
    return [study_seed + SEED_OFFSET + i for i in range(1, n + 1)]


def load(user_attrs: Mapping[str, Any]) -> dict[int, list[Confirmation]]:
    """The stored confirmations, by trial number."""
    return {int(k): [Confirmation.from_dict(c) for c in v] for k, v in user_attrs.get(ATTR, {}).items()}


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


def confirm(ctx: StudyContext, n: int, observer: StudyObserver) -> None:
    """Run the confirmations the study lacks (see the module's doc)."""
    from autotune.results import StudyResult
    from autotune.study import build_workload_for

    if n <= 0 or ctx.workload is None or ctx.slo is None:
        return
    study = ctx.study
    seeds = workload_seeds(ctx.config.seed, n)
    study.set_user_attr(ATTR_SEEDS, seeds)
    stored = load(study.user_attrs)
    result = StudyResult.of(study)
    workloads: dict[int, Any] = {}
    for row in distinct_settings(result.ranked_feasible())[:CANDIDATES]:
        records = stored.setdefault(row.number, [])  # new runs are stored on the setting's best trial
        for index, seed in enumerate(seeds, start=1):
            runs = setting_records(result.rows, stored, row.params)
            if verdict(runs, seeds) is not None:
                break
            if any(c.workload_seed == seed for c in runs):
                continue
            if seed not in workloads:
                workloads[seed] = build_workload_for(ctx, seed)
            spec = TrialSpec(
                kind=TrialKind.COLOCATED, system=ctx.system.name, params=dict(row.params),
                policy=ctx.system.policy(row.params), model=ctx.model, workload=workloads[seed], seed=seed,
                lora_serving=ctx.lora_serving, warmup_s=ctx.config.warmup_s,
                label=f"confirm-{row.number}-seed{seed}",
            )
            observer.on_confirm_start(ctx, row.number, row.params, index, n)
            record = Confirmation.of(ctx.backend.run_trial(spec, observer.on_progress), ctx.slo, seed)
            records.append(record)
            study.set_user_attr(ATTR, {str(k): [c.to_dict() for c in v] for k, v in stored.items() if v})
            observer.on_confirm_end(ctx, row.number, record)
        if verdict(setting_records(result.rows, stored, row.params), seeds):
            return  # lower settings cannot beat a confirmed one


def distinct_settings(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The first row of each distinct setting (knob values), order kept."""
    seen: list[Mapping[str, float]] = []
    out: list[TrialRow] = []
    for r in rows:
        if r.params not in seen:
            seen.append(r.params)
            out.append(r)
    return out
