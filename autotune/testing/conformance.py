"""Checks that every system and every backend must pass.

The project's tests run them against each registered system on each backend
that can run on the machine at hand; a new system or backend gets them for
free. Each check raises ``AssertionError`` with a message naming what broke.
"""

from __future__ import annotations

import math

import numpy as np

from autotune.backends import Backend
from autotune.models import ModelConfig
from autotune.policy import SharingPolicy
from autotune.systems import System
from autotune.trial import TrialKind, TrialResult, TrialSpec
from autotune.workloads.spec import RequestSpec, Workload


def check_system(system: System) -> None:
    """Knobs are well declared, the shipped ranges respect them, and every
    point of the space gives a valid policy."""
    names = [k.name for k in system.knobs]
    assert len(names) == len(set(names)), f"{system.name}: duplicate knob names {names}"
    assert system.knobs, f"{system.name}: declares no knob"
    assert 0.0 < system.gpu_memory_utilization <= 1.0
    for k in system.knobs:
        assert k.unit, f"{system.name}.{k.name}: no unit"
        assert k.min_allowed <= k.default <= k.max_allowed, f"{system.name}.{k.name}: default outside its limits"
    space = system.search_space()
    assert space.names == tuple(names), f"{system.name}: search space knobs {space.names} != {names}"
    rng = np.random.default_rng(0)
    points = [space.defaults()] + [
        {k.name: _draw(k, rng) for k in space} for _ in range(20)
    ]
    for params in points:
        policy = system.policy(params)
        assert isinstance(policy, SharingPolicy), f"{system.name}.policy returned {type(policy).__name__}"


def _draw(knob, rng: np.random.Generator) -> float:
    lo, hi = knob.low, knob.high
    if knob.type == "int":
        return int(rng.integers(int(lo), int(hi) + 1))
    if knob.log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def small_workload(n: int = 40, rate_req_s: float = 2.0, seed: int = 0) -> Workload:
    """A light, fixed workload: Poisson arrivals, ShareGPT-like lengths."""
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate_req_s, n - 1))])
    prompts = rng.integers(32, 400, n)
    outputs = rng.integers(16, 300, n)
    reqs = tuple(RequestSpec(float(a), int(p), int(o)) for a, p, o in zip(t, prompts, outputs))
    return Workload(reqs, rate_req_s, seed, synthetic=True, description="conformance workload")


def _spec(kind: TrialKind, system: System, model: ModelConfig, workload: Workload | None) -> TrialSpec:
    params = system.search_space().defaults()
    return TrialSpec(kind=kind, system=system.name, params=params, policy=system.policy(params),
                     model=model, workload=workload, seed=0)


def _check_serving(result: TrialResult, workload: Workload, what: str) -> None:
    s = result.serving
    assert s is not None, f"{what}: no serving metrics"
    assert s.completed == len(workload) and s.failed == 0, f"{what}: {s.completed} of {len(workload)} completed"
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = getattr(s, name)
        values = (stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)
        assert all(math.isfinite(v) and v > 0 for v in values), f"{what}: {name} stats {values}"
        assert stats.p50_ms <= stats.p90_ms <= stats.p99_ms, f"{what}: {name} percentiles out of order"
    assert s.total_output_tokens == sum(r.output_len for r in workload.requests), f"{what}: output tokens"


def check_backend(backend: Backend, system: System, model: ModelConfig, workload: Workload) -> dict[str, TrialResult]:
    """The three kinds of trial on a light workload: each measures what it should."""
    out = {}
    alone = backend.run_trial(_spec(TrialKind.SERVING_ALONE, system, model, workload))
    assert alone.error is None, f"serving alone crashed: {alone.error}"
    _check_serving(alone, workload, "serving alone")
    assert alone.peft is None or alone.peft.peft_samples_per_s == 0.0, "serving alone trained"
    out["serving_alone"] = alone

    trainer = backend.run_trial(_spec(TrialKind.TRAINER_ALONE, system, model, None))
    assert trainer.error is None, f"trainer alone crashed: {trainer.error}"
    assert trainer.serving is None or trainer.serving.completed == 0, "trainer alone served"
    assert trainer.peft is not None and trainer.peft.peft_samples_per_s > 0, "trainer alone trained nothing"
    out["trainer_alone"] = trainer

    both = backend.run_trial(_spec(TrialKind.COLOCATED, system, model, workload))
    assert both.error is None, f"{system.name} colocated crashed: {both.error}"
    _check_serving(both, workload, f"{system.name} colocated")
    assert both.peft is not None and both.peft.peft_samples_per_s >= 0
    assert both.peft.peft_samples_per_s <= trainer.peft.peft_samples_per_s * 1.05, (
        f"{system.name}: colocated PEFT {both.peft.peft_samples_per_s:.3f} beats the trainer alone "
        f"{trainer.peft.peft_samples_per_s:.3f}"
    )
    out["colocated"] = both
    metrics = both.metrics()
    assert all(isinstance(v, float | int) and math.isfinite(v) for v in metrics.values()), metrics
    return out
