"""Search quality of the samplers on the embedded simulator.

For each system on fig8a at each rate: the best feasible PEFT throughput a
40-trial study finds, as a fraction of the optimum, median over sampler
seeds, per sampler (``random`` is random search with the same budget); and
how many trials it takes to reach 0.95 of the optimum.

The optimum is the best feasible point of a dense grid, evaluated directly
with the backend (``prepare`` + ``run_references``, then
``backend.run_trial(trial_spec(ctx, params, 0))`` and ``constraint_margins``),
not through Optuna; where the grid is coarse (llmstation) the best point any
sampler run found is a second reference, and the optimum is the larger.

Ground truth is shared: the workload seed is fixed (``StudyConfig.seed = 0``)
and only the sampler's seed varies; the simulator runs without noise, so a
trial's result depends on its knobs alone (checked at start: the trial seed
``config.seed + number`` does not change it). Sampler runs memoise repeated
knob values (same result, less time).

Held-out check: the optimum and every sampler run's final best setting are
run again on fresh traffic (workload seeds 1..N, the same SLO in ms, which
stays the seed-0 reference's), and the report says how many still meet the
SLO. Where the knobs bind only inside the band of P99 that workload details
move by themselves, a best setting found on one workload is partly luck; this
check shows how much.

    python benchmarks/search_quality.py --default-slo-rates 4 8 16   # ~1 h on 2 cores; writes benchmarks/results/search_quality.{json,md}
    python benchmarks/search_quality.py --rates 4 --seeds 2 --systems chunked --samplers tpe random --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from autotune.backends import Backend, ProgressFn, make_backend, no_progress
from autotune.confirm import confirm
from autotune.context import StudyConfig, StudyObserver
from autotune.records import CONFIRMATIONS_ATTR
from autotune.results import StudyResult
from autotune.samplers import make_sampler
from autotune.slo import SloSpec, constraint_margins, feasible
from autotune.study import _reference_spec, prepare, run_references, run_trials, trial_spec
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialResult, TrialSpec

#: The hardware profile the committed results were measured on (the simulator's default
#: was h100-80gb then); pinned so a rerun measures the same thing.
PROFILE = "h100-80gb"

SYSTEMS = ("vllm-torchtune", "chunked", "fineinfer", "llmstation")
SAMPLERS = ("gp", "tpe", "random")
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_SECONDS = 60  # num_prompts = this x rate: 60 s of traffic per trial
REACH = 0.95  # "trials to reach" this fraction of the optimum
TARGET = 0.97  # the target fraction
FINEINFER_GRID_POINTS = 40  # log-spaced defer values
#: llmstation grid, per pass (forward and backward alike): tasklets x wait.
LLMSTATION_GRIDS = {
    "full": ((1, 2, 3, 4, 6, 8, 12, 16, 24, 33), (0.0, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05)),
    "coarse": ((1, 2, 4, 8, 16, 33), (0.0, 0.005, 0.01, 0.02, 0.05)),
    "smoke": ((1, 33), (0.0, 0.05)),  # for trying the script out
}


@dataclass(frozen=True)
class Scenario:
    name: str
    slo: SloSpec
    rates_req_s: tuple[float, ...]


# ---------------------------------------------------------------- grids


def dense_grid(system: str, llmstation_grid: str) -> list[dict[str, float]]:
    """Every value of a 1-D knob's shipped range (log-spaced points for a continuous
    one); for llmstation a product of per-pass (tasklets, wait) values."""
    space = get_system(system).search_space()
    if system == "llmstation":
        tasklets, waits = LLMSTATION_GRIDS[llmstation_grid]
        return [
            {"forward_tasklets": ft, "forward_wait_s": fw, "backward_tasklets": bt, "backward_wait_s": bw}
            for ft, fw, bt, bw in itertools.product(tasklets, waits, tasklets, waits)
        ]
    (knob,) = space.knobs
    values = knob.grid(max_points=FINEINFER_GRID_POINTS, max_steps=10_000)
    return [{knob.name: v} for v in values]


# ---------------------------------------------------------------- workers


class MemoBackend(Backend):
    """The sim backend, remembering results by (kind, knobs): the sim without
    noise is deterministic, so a repeated point need not be run again."""

    name = "sim"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.memo: dict[tuple, TrialResult] = {}
        self.runs = 0  # trials actually simulated

    @property
    def hardware(self) -> str:
        return self.inner.hardware

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def cache_key(self) -> str:
        return self.inner.cache_key()

    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        # The workload's seed, not the trial's: confirmation runs one setting on several workloads.
        key = (spec.kind, tuple(sorted(spec.params.items())), spec.workload.seed if spec.workload else None)
        if key not in self.memo:
            self.runs += 1
            self.memo[key] = self.inner.run_trial(spec, progress)
        return self.memo[key]


def _config(system: str, rate: float, scenario: Scenario, work: Path, tag: str) -> StudyConfig:
    return StudyConfig(
        system=system, figure="fig8a", rate_req_s=rate, num_prompts=int(round(PROMPT_SECONDS * rate)),
        slo=scenario.slo, seed=0, runs_dir=work / "runs", storage=str(work / "db" / f"{tag}.log"),
        study_name=tag,
    )


def _point(params: Mapping[str, float], result: TrialResult, margins: Mapping[str, float]) -> dict[str, Any]:
    m = result.metrics()
    return {
        "params": dict(params),
        "peft_samples_per_s": 0.0 if result.crashed else m.get("peft_samples_per_s", 0.0),
        "ttft_p99_ms": m.get("ttft_p99_ms"),
        "tpot_p99_ms": m.get("tpot_p99_ms"),
        "margins": dict(margins),
        "feasible": feasible(margins),
        "error": result.error,
    }


def grid_task(task: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a chunk of grid points directly with the backend."""
    scenario, work = _scenario(task), Path(task["work"])
    backend = make_backend("sim", profile=PROFILE)
    ctx = prepare(_config(task["system"], task["rate"], scenario, work, task["id"]), backend)
    run_references(ctx, StudyObserver())
    points = []
    for params in task["points"]:
        result = backend.run_trial(trial_spec(ctx, params, 0))
        points.append(_point(params, result, constraint_margins(result, ctx.slo)))
    return {**_key(task), "kind": "grid", "id": task["id"], "points": points, "slo": ctx.slo.to_dict()}


def sampler_task(task: dict[str, Any]) -> dict[str, Any]:
    """One study: n_trials trials of one sampler with one sampler seed."""
    scenario, work = _scenario(task), Path(task["work"])
    backend = MemoBackend(make_backend("sim", profile=PROFILE))
    ctx = prepare(_config(task["system"], task["rate"], scenario, work, task["id"]), backend)
    # Workload seed stays 0; only the sampler's seed varies.
    ctx.study.sampler = make_sampler(task["sampler"], ctx.space, seed=task["seed"])
    run_references(ctx, StudyObserver())
    t0 = time.perf_counter()
    run_trials(ctx, task["n_trials"], StudyObserver())
    wall_s = time.perf_counter() - t0
    rows = sorted(StudyResult.of(ctx.study).rows, key=lambda r: r.number)
    trace = [{"number": r.number, "params": r.params, "peft_samples_per_s": r.peft_samples_per_s,
              "feasible": r.feasible} for r in rows]
    return {**_key(task), "kind": "sampler", "id": task["id"], "sampler": task["sampler"], "seed": task["seed"],
            "trace": trace, "simulated_trials": backend.runs, "wall_s": wall_s, "slo": ctx.slo.to_dict()}


def confirm_task(task: dict[str, Any]) -> dict[str, Any]:
    """``--confirm N`` on a finished sampler run: reopen its study (the same
    journal file) and run the product's confirmation step on it."""
    scenario, work = _scenario(task), Path(task["work"])
    backend = MemoBackend(make_backend("sim", profile=PROFILE))
    ctx = prepare(_config(task["system"], task["rate"], scenario, work, task["run_id"]), backend)
    run_references(ctx, StudyObserver())
    ctx.study.set_user_attr(CONFIRMATIONS_ATTR, {})  # start from none: a rerun measures a fresh confirmation
    confirm(ctx, task["confirm_workloads"], StudyObserver())
    result = StudyResult.of(ctx.study)
    rec = result.recommended
    return {**_key(task), "kind": "confirm", "id": task["id"], "run_id": task["run_id"], "sampler": task["sampler"],
            "seed": task["seed"], "confirm_workloads": task["confirm_workloads"], "confirmation_runs": backend.runs,
            "recommended": None if rec is None else {"params": rec.params, "peft_samples_per_s": rec.peft_samples_per_s}}


def heldout_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run settings on fresh workloads (seeds other than 0) against the SLO in
    ms that the seed-0 reference gave; and serving alone on each, to show
    whether the SLO leaves any room on that workload at all."""
    scenario, work = _scenario(task), Path(task["work"])
    backend = make_backend("sim", profile=PROFILE)
    ctx0 = prepare(_config(task["system"], task["rate"], scenario, work, task["id"]), backend)
    run_references(ctx0, StudyObserver())  # cached: only the SLO is needed
    points = []
    for wseed in task["workload_seeds"]:
        config = replace(_config(task["system"], task["rate"], scenario, work, f"{task['id']}-w{wseed}"), seed=wseed)
        ctx = prepare(config, backend)
        alone = backend.run_trial(_reference_spec(ctx, TrialKind.SERVING_ALONE))
        points.append({**_point({}, alone, constraint_margins(alone, ctx0.slo)), "workload_seed": wseed,
                       "serving_alone": True})
        for params in task["points"]:
            result = backend.run_trial(trial_spec(ctx, params, 0))
            points.append({**_point(params, result, constraint_margins(result, ctx0.slo)), "workload_seed": wseed})
    return {**_key(task), "kind": "heldout", "id": task["id"], "points": points}


def _scenario(task: Mapping[str, Any]) -> Scenario:
    sc = task["scenario"]
    return Scenario(sc["name"], SloSpec(**sc["slo"]), tuple(sc["rates_req_s"]))


def _key(task: Mapping[str, Any]) -> dict[str, Any]:
    return {"scenario": task["scenario"]["name"], "system": task["system"], "rate": task["rate"]}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    kinds = {"grid": grid_task, "sampler": sampler_task, "confirm": confirm_task, "heldout": heldout_task}
    out = kinds[task["kind"]](task)
    out["task_wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- set-up


def check_seed_independence(system: str, rate: float, scenario: Scenario, work: Path) -> None:
    """The grid uses trial number 0; studies use 0..39. With noise 0 the result
    must not depend on the trial seed, else the grid is not their ground truth."""
    backend = make_backend("sim", profile=PROFILE)
    ctx = prepare(_config(system, rate, scenario, work, f"seedcheck-{system}-{rate:g}-{scenario.name}"), backend)
    params = ctx.space.defaults()
    a, b = (backend.run_trial(trial_spec(ctx, params, n)).metrics() for n in (0, 37))
    a.pop("trial_wall_s"), b.pop("trial_wall_s")
    assert a == b, f"{system} at {rate:g} req/s: a trial's result depends on its seed"


def make_references(scenarios: Sequence[Scenario], systems: Sequence[str], work: Path) -> None:
    """Reference runs once, in this process: the workers only read the cache."""
    for sc in scenarios:
        for system in systems:
            for rate in sc.rates_req_s:
                ctx = prepare(_config(system, rate, sc, work, f"ref-{system}-{rate:g}-{sc.name}"), make_backend("sim", profile=PROFILE))
                run_references(ctx, StudyObserver())


def make_tasks(scenarios: Sequence[Scenario], systems: Sequence[str], samplers: Sequence[str], seeds: Sequence[int],
               n_trials: int, llmstation_grid: str, chunk: int, work: Path) -> list[dict[str, Any]]:
    tasks = []
    for sc in scenarios:
        sc_dict = {"name": sc.name, "slo": vars(sc.slo), "rates_req_s": list(sc.rates_req_s)}
        for system in systems:
            grid = dense_grid(system, llmstation_grid)
            for rate in sc.rates_req_s:
                base = {"scenario": sc_dict, "system": system, "rate": rate, "work": str(work)}
                for i in range(0, len(grid), chunk):
                    tasks.append({**base, "kind": "grid", "id": f"{sc.name}-{system}-{rate:g}-grid{i}",
                                  "points": grid[i:i + chunk], "cost": len(grid[i:i + chunk]) * rate})
                for sampler, seed in itertools.product(samplers, seeds):
                    tasks.append({**base, "kind": "sampler", "id": f"{sc.name}-{system}-{rate:g}-{sampler}-s{seed}",
                                  "sampler": sampler, "seed": seed, "n_trials": n_trials,
                                  "cost": n_trials * rate * (3 if sampler == "gp" else 1)})
    return sorted(tasks, key=lambda t: -t["cost"])  # longest first: the two workers finish together


# ---------------------------------------------------------------- analysis


def trials_to_reach(trace: Sequence[Mapping[str, Any]], level: float) -> int | None:
    """1-based count of trials until the best feasible reaches ``level``; None: never."""
    best = 0.0
    for i, t in enumerate(trace, start=1):
        if t["feasible"]:
            best = max(best, t["peft_samples_per_s"])
        if level > 0 and best >= level:
            return i
    return None


def best_feasible(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    feas = [p for p in points if p["feasible"]]
    return max(feas, key=lambda p: p["peft_samples_per_s"], default=None)


def summarise(results: Sequence[Mapping[str, Any]], samplers: Sequence[str], n_trials: int) -> list[dict[str, Any]]:
    cells: dict[tuple, dict[str, list]] = {}
    confirms = {r["run_id"]: r for r in results if r["kind"] == "confirm"}
    for r in results:
        if r["kind"] not in ("grid", "sampler"):
            continue
        cell = cells.setdefault((r["scenario"], r["system"], r["rate"]), {"grid": [], "runs": [], "slo": r["slo"]})
        if r["kind"] == "grid":
            cell["grid"] += r["points"]
        elif r["kind"] == "sampler":
            cell["runs"].append(r)
    out = []
    for (scenario, system, rate), cell in cells.items():
        grid_best = best_feasible(cell["grid"])
        run_best = best_feasible([t for run in cell["runs"] for t in run["trace"]])
        grid_opt = grid_best["peft_samples_per_s"] if grid_best else 0.0
        run_opt = run_best["peft_samples_per_s"] if run_best else 0.0
        optimum = max(grid_opt, run_opt)
        row: dict[str, Any] = {
            "scenario": scenario, "system": system, "rate_req_s": rate, "slo": cell["slo"],
            "grid_size": len(cell["grid"]), "grid_feasible": sum(p["feasible"] for p in cell["grid"]),
            "grid_best": grid_best, "sampler_best": run_best,
            "grid_optimum_samples_per_s": grid_opt, "sampler_best_samples_per_s": run_opt,
            "optimum_samples_per_s": optimum, "samplers": {},
            "optimum_params": (None if optimum <= 0 else
                               dict((grid_best if grid_opt >= run_opt else run_best)["params"])),
        }
        for sampler in samplers:
            runs = sorted((r for r in cell["runs"] if r["sampler"] == sampler), key=lambda r: r["seed"])
            if not runs:
                continue
            finals, reach, bests = [], [], []
            for run in runs:
                b = best_feasible(run["trace"][:n_trials])
                bests.append(dict(b["params"]) if b else None)
                final = b["peft_samples_per_s"] if b else 0.0
                finals.append(final / optimum if optimum > 0 else None)
                reach.append(trials_to_reach(run["trace"][:n_trials], REACH * optimum))
            recs = [confirms.get(run["id"]) for run in runs]
            fr = [f for f in finals if f is not None]
            reach_num = [math.inf if x is None else x for x in reach]
            med_reach = statistics.median(reach_num)
            row["samplers"][sampler] = {
                "seeds": [r["seed"] for r in runs],
                "fraction": finals,
                "fraction_median": statistics.median(fr) if fr else None,
                "fraction_min": min(fr) if fr else None,
                "fraction_max": max(fr) if fr else None,
                "trials_to_095": reach,  # None: not reached within the budget
                "trials_to_095_median": None if math.isinf(med_reach) else med_reach,
                "reached_095": sum(x is not None for x in reach),
                "best_params": bests,  # per run; None: nothing feasible
                # --confirm: per run, the recommended setting (None: none held, or not run)
                "confirm_workloads": next((c["confirm_workloads"] for c in recs if c), None),
                "recommended_params": [c["recommended"]["params"] if c and c["recommended"] else None for c in recs],
                "recommended_fraction": [
                    None if c is None or optimum <= 0 else
                    (c["recommended"]["peft_samples_per_s"] / optimum if c["recommended"] else 0.0) for c in recs],
                "confirmation_runs": [c["confirmation_runs"] if c else None for c in recs],
                "simulated_trials": [r["simulated_trials"] for r in runs],
                "study_wall_s": [round(r["wall_s"], 2) for r in runs],
            }
        out.append(row)
    return sorted(out, key=lambda r: (r["scenario"], SYSTEMS.index(r["system"]), r["rate_req_s"]))


def overall(rows: Sequence[Mapping[str, Any]], samplers: Sequence[str], scenario: str) -> dict[str, Any]:
    """Per sampler over the scenario's (system, rate) cells with an optimum > 0."""
    rows = [r for r in rows if r["scenario"] == scenario and r["optimum_samples_per_s"] > 0]
    out = {}
    for s in samplers:
        meds = [r["samplers"][s]["fraction_median"] for r in rows if s in r["samplers"]]
        alls = [f for r in rows if s in r["samplers"] for f in r["samplers"][s]["fraction"]]
        reach = [math.inf if x is None else x for r in rows if s in r["samplers"] for x in r["samplers"][s]["trials_to_095"]]
        if not meds:
            continue
        out[s] = {
            "cells": len(meds),
            "cells_median_at_least_target": sum(m >= TARGET for m in meds),
            "worst_cell_median": min(meds),
            "mean_of_cell_medians": statistics.fmean(meds),
            "mean_over_all_runs": statistics.fmean(alls),
            "worst_run": min(alls),
            "runs_reaching_095": sum(not math.isinf(x) for x in reach),
            "runs": len(reach),
            "median_trials_to_095_all_runs": None if math.isinf(statistics.median(reach)) else statistics.median(reach),
        }
    return out


def confirm_tasks(tasks: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """One per sampler run: its study, confirmed on ``n`` fresh workloads."""
    if n < 1:
        return []
    return [{**{k: t[k] for k in ("scenario", "system", "rate", "work", "sampler", "seed")}, "kind": "confirm",
             "id": f"{t['id']}-confirm{n}-v3", "run_id": t["id"], "confirm_workloads": n, "cost": 6 * t["rate"]}
            for t in tasks if t["kind"] == "sampler"]


def heldout_tasks(cells: Sequence[Mapping[str, Any]], scenarios: Sequence[Scenario], n_seeds: int,
                  work: Path) -> list[dict[str, Any]]:
    """Per cell with an optimum: the optimum and every run's best, on fresh workloads."""
    by_name = {sc.name: sc for sc in scenarios}
    tasks = []
    for cell in cells:
        if cell["optimum_params"] is None or n_seeds < 1:
            continue
        points = [cell["optimum_params"]]
        for d in cell["samplers"].values():
            points += [p for p in d["best_params"] + d["recommended_params"] if p is not None]
        unique = list({json.dumps(p, sort_keys=True): p for p in points}.values())
        sc = by_name[cell["scenario"]]
        digest = hashlib.sha1(json.dumps([unique, n_seeds, "alone"], sort_keys=True).encode()).hexdigest()[:10]
        tasks.append({"kind": "heldout", "scenario": {"name": sc.name, "slo": vars(sc.slo), "rates_req_s": list(sc.rates_req_s)},
                      "system": cell["system"], "rate": cell["rate_req_s"], "work": str(work),
                      "id": f"{sc.name}-{cell['system']}-{cell['rate_req_s']:g}-heldout-{digest}",
                      "points": unique, "workload_seeds": list(range(1, n_seeds + 1)),
                      "cost": len(unique) * n_seeds * cell["rate_req_s"]})
    return sorted(tasks, key=lambda t: -t["cost"])


def attach_heldout(cells: Sequence[dict[str, Any]], results: Sequence[Mapping[str, Any]], n_seeds: int) -> None:
    """For each cell: on how many fresh workloads the optimum, and each run's
    best, still meet the SLO."""
    wanted = set(range(1, n_seeds + 1))
    for cell in cells:
        ok: dict[str, set[int]] = {}
        seen: dict[str, set[int]] = {}
        alone: dict[int, Mapping[str, Any]] = {}
        for r in results:
            if r["kind"] != "heldout" or (r["scenario"], r["system"], r["rate"]) != (
                    cell["scenario"], cell["system"], cell["rate_req_s"]):
                continue
            for p in r["points"]:
                if p["workload_seed"] not in wanted:
                    continue
                if p.get("serving_alone"):
                    alone[p["workload_seed"]] = p
                    continue
                key = json.dumps(p["params"], sort_keys=True)
                seen.setdefault(key, set()).add(p["workload_seed"])
                if p["feasible"]:
                    ok.setdefault(key, set()).add(p["workload_seed"])

        def count(params: Mapping[str, float] | None) -> int | None:
            if params is None:
                return None
            key = json.dumps(params, sort_keys=True)
            return len(ok.get(key, ())) if seen.get(key) == wanted else None

        cell["heldout_seeds"] = n_seeds
        cell["heldout_serving_alone"] = [
            {"workload_seed": k, "ttft_p99_ms": v["ttft_p99_ms"], "tpot_p99_ms": v["tpot_p99_ms"],
             "meets_slo": v["feasible"]} for k, v in sorted(alone.items())]
        cell["optimum_heldout_feasible"] = count(cell["optimum_params"])
        for d in cell["samplers"].values():
            d["heldout_feasible"] = [count(p) for p in d["best_params"]]
            d["recommended_heldout_feasible"] = [count(p) for p in d["recommended_params"]]


# ---------------------------------------------------------------- report


def _fmt_params(p: Mapping[str, float] | None) -> str:
    if p is None:
        return "-"
    return ", ".join(f"{k}={v:g}" for k, v in p["params"].items())


def markdown(report: Mapping[str, Any]) -> str:
    samplers, n = report["samplers"], report["n_trials"]
    mach = report["machine"]
    lines = [
        "# Search quality of the samplers (embedded simulator)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu_model']}), Python {mach['python']}, Optuna {mach['optuna']}, "
        f"{mach['platform']}; {report['workers']} worker processes; wall of this invocation "
        f"{report['wall_s'] / 60:.1f} min; time of all {len(report['raw'])} tasks summed (each is one process's "
        f"wall time, whichever invocation of the same work dir ran it): {report['task_wall_s_sum'] / 60:.1f} min.",
        "",
        f"Set-up: fig8a (synthetic ShareGPT-like prompts, Poisson arrivals, workload seed 0), "
        f"{PROMPT_SECONDS} x rate prompts per trial ({PROMPT_SECONDS} s of traffic), llama-3.1-8b on the H100 80GB "
        f"profile, no simulator noise (results depend on the knobs only; checked). {n} trials per study, the "
        f"first being the artifact's example setting; sampler seeds {report['seeds']}. Fraction = best feasible "
        f"PEFT samples/s after {n} trials / optimum. Optimum = max(best feasible grid point, best feasible point "
        f"any sampler run found). Trials to {REACH}: first trial count at which the best feasible reaches "
        f"{REACH} x optimum; '>{n}' when the median run does not reach it.",
        "",
        f"Grids: vllm-torchtune every 5 % of 10..100; chunked every 32 tokens of 32..512; fineinfer "
        f"{FINEINFER_GRID_POINTS} log-spaced defer values over 0.001..1 s; llmstation "
        f"{report['llmstation_grid_desc']}.",
        "",
    ]
    for sc in report["scenarios"]:
        lines += [f"## {sc['name']}: SLO P99 TTFT <= {sc['slo']['ttft_ratio']:g}x, P99 TPOT <= "
                  f"{sc['slo']['tpot_ratio']:g}x serving alone", ""]
        head = "| system | rate | SLO TTFT/TPOT (ms) | grid (feasible) | grid opt | sampler best | optimum (samples/s) |"
        sep = "|---|---:|---|---:|---:|---:|---:|"
        for s in samplers:
            head += f" {s}: fraction median (min..max) | {s}: trials to {REACH} |"
            sep += "---:|---:|"
        lines += [head, sep]
        rows = [r for r in report["cells"] if r["scenario"] == sc["name"]]
        for r in rows:
            line = (f"| {r['system']} | {r['rate_req_s']:g} | {r['slo']['ttft_p99_ms']:.1f} / {r['slo']['tpot_p99_ms']:.2f} | "
                    f"{r['grid_size']} ({r['grid_feasible']}) | {r['grid_optimum_samples_per_s']:.3f} | "
                    f"{r['sampler_best_samples_per_s']:.3f} | {r['optimum_samples_per_s']:.3f} |")
            for s in samplers:
                d = r["samplers"].get(s)
                if d is None or d["fraction_median"] is None:
                    line += " n/a | n/a |"
                    continue
                reach = d["trials_to_095_median"]
                reach_s = f">{n}" if reach is None else f"{reach:g}"
                line += (f" {d['fraction_median']:.3f} ({d['fraction_min']:.3f}..{d['fraction_max']:.3f}) | "
                         f"{reach_s} ({d['reached_095']}/{len(d['seeds'])}) |")
            lines.append(line)
        lines += ["", "Where the optimum lies (best feasible grid point; best sampler point):", ""]
        for r in rows:
            lines.append(f"- {r['system']} @ {r['rate_req_s']:g} req/s: grid {_fmt_params(r['grid_best'])}; "
                         f"samplers {_fmt_params(r['sampler_best'])}")
        lines += ["", f"Over all cells of this scenario (cells with a feasible optimum):", "",
                  f"| sampler | cells with median >= {TARGET} | worst cell median | mean of cell medians | "
                  f"mean over runs | worst run | runs reaching {REACH} | median trials to {REACH} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s, o in report["overall"][sc["name"]].items():
            t = o["median_trials_to_095_all_runs"]
            lines.append(f"| {s} | {o['cells_median_at_least_target']}/{o['cells']} | {o['worst_cell_median']:.3f} | "
                         f"{o['mean_of_cell_medians']:.3f} | {o['mean_over_all_runs']:.3f} | {o['worst_run']:.3f} | "
                         f"{o['runs_reaching_095']}/{o['runs']} | {f'>{n}' if t is None else f'{t:g}'} |")
        lines.append("")
        n_held = report["heldout_workload_seeds"]
        if n_held:
            lines += _heldout_lines(rows, samplers, len(n_held), report["confirm_workloads"])
    lines += ["(trials to 0.95: median over seeds, and in brackets how many seeds reached it within the budget.)", ""]
    return "\n".join(lines) + "\n"


def _heldout_lines(rows: Sequence[Mapping[str, Any]], samplers: Sequence[str], n_held: int,
                   n_confirm: int) -> list[str]:
    lines = [f"Held-out check: settings run again on {n_held} fresh workloads (seeds 1..{n_held}), same SLO "
             f"in ms. *optimum*: on how many of them it still meets the SLO. Per sampler, *best holds*: runs "
             f"whose best feasible setting meets it on all {n_held} (of the runs that found one)."]
    if n_confirm:
        lines[0] += (f" *--confirm {n_confirm}*: the same runs after autotune's confirmation step (the best "
                     f"settings re-run on {n_confirm} other fresh workloads, seeds {1_000_001}..{1_000_000 + n_confirm}; "
                     f"the recommendation is the best that meets the SLO on all): runs whose recommendation meets "
                     f"it on all {n_held} held-out workloads (in brackets: runs with no recommendation), and the "
                     f"recommendation's median fraction of the optimum (0 where none).")
    lines[0] += (" *serving alone*: the server with no trainer at all on the same fresh workloads: on how many "
                 "it meets the SLO, and its P99 TPOT range.")
    head, sep = "| system | rate | serving alone | optimum |", "|---|---:|---|---:|"
    for s in samplers:
        head += f" {s}: best holds |"
        sep += "---:|"
        if n_confirm:
            head += f" {s}: --confirm {n_confirm} holds | {s}: --confirm {n_confirm} fraction |"
            sep += "---:|---:|"
    lines += ["", head, sep]
    for r in rows:
        if r.get("optimum_heldout_feasible") is None:
            continue
        alone = r.get("heldout_serving_alone", [])
        tpots = [a["tpot_p99_ms"] for a in alone]
        alone_s = (f"{sum(a['meets_slo'] for a in alone)}/{len(alone)}, {min(tpots):.2f}..{max(tpots):.2f} ms"
                   if alone else "n/a")
        line = f"| {r['system']} | {r['rate_req_s']:g} | {alone_s} | {r['optimum_heldout_feasible']}/{n_held} |"
        for s in samplers:
            d = r["samplers"].get(s, {})
            counts = [c for c in d.get("heldout_feasible", []) if c is not None]
            line += f" {sum(c == n_held for c in counts)}/{len(counts)} |" if counts else " n/a |"
            if n_confirm:
                fr = [f for f in d.get("recommended_fraction", []) if f is not None]
                rc = d.get("recommended_heldout_feasible", [])
                none = sum(p is None for p, f in zip(d.get("recommended_params", []), d.get("recommended_fraction", []))
                           if f is not None)
                holds = sum(c == n_held for c in rc if c is not None)
                line += (f" {holds}/{len(fr)} ({none}) | {statistics.median(fr):.3f} |" if fr else " n/a | n/a |")
        lines.append(line)
    return lines + [""]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "optuna": optuna.__version__, "numpy": np.__version__}


def command_line() -> str:
    """This run's command, relative to the repository root; local paths of
    --work-dir and --log shown as placeholders."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv[:-1]):
        if a in ("--work-dir", "--log"):
            argv[i + 1] = "<" + a.removeprefix("--").replace("-", " ") + ">"
    return " ".join(["python", script.as_posix(), *argv])


# ---------------------------------------------------------------- main


def run_pool(tasks: Sequence[dict[str, Any]], finished: Sequence[Mapping[str, Any]], done_path: Path, workers: int,
             say) -> list[dict[str, Any]]:
    """Run the tasks not already in ``finished``; each result is appended to
    ``done_path`` as it arrives. Returns the new results."""
    have = {r["id"] for r in finished}
    todo = [t for t in tasks if t["id"] not in have]
    if not todo:
        return []
    total_cost, cost_done, new = sum(t["cost"] for t in todo), 0.0, []
    costs = {t["id"]: t["cost"] for t in todo}
    t_pool = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool, open(done_path, "a") as done:
        for i, r in enumerate(pool.imap_unordered(run_task, todo), start=1):
            done.write(json.dumps(r) + "\n")
            done.flush()
            new.append(r)
            cost_done += costs[r["id"]]
            elapsed = time.perf_counter() - t_pool
            eta = elapsed * (total_cost / cost_done - 1)
            say(f"[{i}/{len(todo)}] {r['id']} {r['task_wall_s']:.1f} s; elapsed {elapsed / 60:.1f} min, "
                f"eta ~{eta / 60:.1f} min")
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=("gp", "tpe", "random", "grid"))
    p.add_argument("--rates", nargs="+", type=float, default=[4.0, 8.0, 16.0], help="req/s")
    p.add_argument("--seeds", type=int, default=5, help="sampler seeds 0..N-1")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--ttft-ratio", type=float, default=1.25, help="P99 TTFT SLO, x serving alone")
    p.add_argument("--tpot-ratio", type=float, default=1.1, help="P99 TPOT SLO, x serving alone")
    p.add_argument("--default-slo-rates", nargs="*", type=float, default=[],
                   help="also run the default SLO (2x TTFT, 1.5x TPOT) at these rates, req/s")
    p.add_argument("--confirm", type=int, default=2,
                   help="also run autotune's --confirm N on every sampler run (0: no)")
    p.add_argument("--heldout-seeds", type=int, default=4,
                   help="fresh workloads (seeds 1..N) to re-run the optimum and each run's best on")
    p.add_argument("--llmstation-grid", choices=sorted(LLMSTATION_GRIDS), default="coarse")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=60, help="grid points per task")
    p.add_argument("--work-dir", type=Path, default=None, help="studies and reference cache (default: a temp dir)")
    p.add_argument("--log", type=Path, default=None, help="progress log (default: stdout)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = open(args.log, "a", buffering=1) if args.log else sys.stdout

    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=log, flush=True)

    scenarios = [Scenario(f"tight SLO ({args.ttft_ratio:g}x TTFT, {args.tpot_ratio:g}x TPOT)",
                          SloSpec(ttft_ratio=args.ttft_ratio, tpot_ratio=args.tpot_ratio), tuple(args.rates))]
    if args.default_slo_rates:
        scenarios.append(Scenario("default SLO (2x TTFT, 1.5x TPOT)", SloSpec(ttft_ratio=2.0, tpot_ratio=1.5), tuple(args.default_slo_rates)))
    # One BLAS/torch thread per worker: the workers already fill the cores (GP uses torch).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="search-quality-"))
    (work / "db").mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    t_start = time.perf_counter()

    for system in args.systems:
        check_seed_independence(system, args.rates[0], scenarios[0], work)
    say("seed independence checked: with noise 0 a trial's result does not depend on its trial seed")
    make_references(scenarios, args.systems, work)
    say("reference runs made")
    tasks = make_tasks(scenarios, args.systems, args.samplers, seeds, args.trials, args.llmstation_grid, args.chunk, work)
    say(f"{len(tasks)} tasks on {args.workers} workers")

    done_path = work / "done.jsonl"  # checkpoint: a rerun with the same --work-dir skips finished tasks
    results = [json.loads(l) for l in done_path.read_text().splitlines()] if done_path.exists() else []
    results += run_pool(tasks, results, done_path, args.workers, say)
    confirming = confirm_tasks(tasks, args.confirm)
    say(f"confirmation (--confirm {args.confirm}) of each sampler run: {len(confirming)} tasks")
    results += run_pool(confirming, results, done_path, args.workers, say)
    planned = {t["id"] for t in tasks + confirming}
    results = [r for r in results if r["id"] in planned or r["kind"] == "heldout"]  # not other runs' tasks
    cells = summarise(results, args.samplers, args.trials)
    held = heldout_tasks(cells, scenarios, args.heldout_seeds, work)
    say(f"held-out check: {len(held)} tasks")
    results += run_pool(held, results, done_path, args.workers, say)
    planned |= {t["id"] for t in held}
    results = [r for r in results if r["id"] in planned]
    cells = summarise(results, args.samplers, args.trials)
    attach_heldout(cells, results, args.heldout_seeds)
    tasklets, waits = LLMSTATION_GRIDS[args.llmstation_grid]
    report = {
        "benchmark": "search_quality",
        "command": command_line(),
        "machine": machine(),
        "workers": args.workers,
        "wall_s": time.perf_counter() - t_start,
        "figure": "fig8a",
        "model": "llama-3.1-8b",
        "backend": "sim (h100-80gb profile, noise 0)",
        "workload_seed": 0,
        "prompt_seconds": PROMPT_SECONDS,
        "n_trials": args.trials,
        "seeds": seeds,
        "samplers": args.samplers,
        "reach_level": REACH,
        "target": TARGET,
        "llmstation_grid": {"name": args.llmstation_grid, "tasklets": tasklets, "waits_s": waits},
        "llmstation_grid_desc": (f"forward and backward tasklets in {{{', '.join(map(str, tasklets))}}} x waits in "
                                 f"{{{', '.join(f'{w:g}' for w in waits)}}} s ({len(tasklets) ** 2 * len(waits) ** 2} points)"),
        "fineinfer_grid_points": FINEINFER_GRID_POINTS,
        "task_wall_s_sum": sum(r.get("task_wall_s", 0.0) for r in results),
        "heldout_workload_seeds": list(range(1, args.heldout_seeds + 1)),
        "confirm_workloads": args.confirm,
        "scenarios": [{"name": s.name, "slo": vars(s.slo), "rates_req_s": list(s.rates_req_s)} for s in scenarios],
        "cells": cells,
        "overall": {s.name: overall(cells, args.samplers, s.name) for s in scenarios},
        "raw": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "search_quality.json").write_text(json.dumps(report, separators=(",", ":"), default=_json_default) + "\n")
    (args.out_dir / "search_quality.md").write_text(markdown(report))
    say(f"done in {report['wall_s'] / 60:.1f} min; written to {args.out_dir}/search_quality.{{json,md}}")


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    main()
