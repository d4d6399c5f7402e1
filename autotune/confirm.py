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
from typing import Any

from autotune.context import StudyContext, StudyObserver, build_workload_for
from autotune.records import (CANDIDATES, CONFIRM_SEEDS_ATTR, CONFIRMATIONS_ATTR, Confirmation, TrialRow,
                              load_confirmations, setting_records, verdict)
from autotune.results import StudyResult
from autotune.trial import TrialKind, TrialSpec

#: Fresh workloads use seeds ``study seed + SEED_OFFSET + 1 .. n``: far from the
#: study's own seed and from the small seeds users pick for other studies.
SEED_OFFSET = 1_000_000


def workload_seeds(study_seed: int, n: int) -> list[int]:
    return [study_seed + SEED_OFFSET + i for i in range(1, n + 1)]


def confirm(ctx: StudyContext, n: int, observer: StudyObserver) -> None:
    """Run the confirmations the study lacks (see the module's doc)."""
    if n <= 0 or ctx.workload is None or ctx.slo is None:
        return
    study = ctx.study
    seeds = workload_seeds(ctx.config.seed, n)
    study.set_user_attr(CONFIRM_SEEDS_ATTR, seeds)
    stored = load_confirmations(study.user_attrs)
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
            study.set_user_attr(CONFIRMATIONS_ATTR, {str(k): [c.to_dict() for c in v] for k, v in stored.items() if v})
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
