"""The measurements a profile is fitted to, and the simulator's numbers for them.

``python -m autotune.sim.calibration [PROFILE]`` prints target vs simulated
(default: ``h100-80gb``, the profile they were measured on).
The serving measurements used vLLM's random dataset (fixed ~215-token prompts,
~198-token answers) at 2 req/s, 90 requests; we replay that with Poisson
arrivals and average the statistics over a few arrival seeds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from autotune.models import ModelConfig, from_name
from autotune.policy import SharingPolicy
from autotune.sim.backend import SimBackend
from autotune.trial import TrialKind, TrialResult, TrialSpec
from autotune.workloads.spec import RequestSpec, Workload

CALIBRATION_MODEL = "llama-3.1-8b"
#: The profile these measurements were taken on (and fitted to).
CALIBRATION_PROFILE = "h100-80gb"
CALIBRATION_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Point:
    name: str  # what was measured
    kind: TrialKind
    thread_pct: int  # the trainer's MPS active-thread %
    metric: str  # key of TrialResult.metrics()
    target: float
    tolerance: float  # relative: |simulated / target - 1| allowed


POINTS = (
    Point("trainer alone", TrialKind.TRAINER_ALONE, 100, "peft_samples_per_s", 3.12, 0.05),
    Point("serving alone", TrialKind.SERVING_ALONE, 100, "ttft_p50_ms", 32.0, 0.10),
    Point("serving alone", TrialKind.SERVING_ALONE, 100, "tpot_p50_ms", 6.9, 0.05),
    Point("both, MPS", TrialKind.COLOCATED, 100, "tpot_p50_ms", 7.95, 0.05),
    Point("both, MPS", TrialKind.COLOCATED, 100, "peft_samples_per_s", 2.94, 0.05),
    Point("both, trainer at 30%", TrialKind.COLOCATED, 30, "tpot_p50_ms", 7.85, 0.05),
    Point("both, trainer at 30%", TrialKind.COLOCATED, 30, "peft_samples_per_s", 2.86, 0.05),
)
#: Measured but not reproduced within 10%: with fixed-length requests the simulated
#: P99 TPOT stays near the P50; the measured 9.4 ms (90 requests) exceeds the
#: co-located run's 8.2 ms, which suggests outliers in that short run.
UNMATCHED = (("serving alone", "tpot_p99_ms", 9.4),)


def calibration_workload(seed: int, rate_req_s: float = 2.0, num_requests: int = 90,
                         prompt_len: int = 215, output_len: int = 198) -> Workload:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_req_s, num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    reqs = tuple(RequestSpec(float(a), prompt_len, output_len) for a in arrivals)
    return Workload(reqs, rate_req_s, seed, True, f"fixed {prompt_len}/{output_len} tokens, Poisson {rate_req_s:g} req/s")


def calibration_spec(kind: TrialKind, thread_pct: int, seed: int, model: ModelConfig | None = None) -> TrialSpec:
    """The measured set-up: vLLM (gpu-memory-utilization 0.45) + torchtune under MPS."""
    policy = SharingPolicy(mps=True, gpu_memory_utilization=0.45, trainer_mps_active_thread_pct=thread_pct)
    workload = None if kind is TrialKind.TRAINER_ALONE else calibration_workload(seed)
    return TrialSpec(kind, "vllm-torchtune", {"mps_active_thread_pct": thread_pct}, policy,
                     model or from_name(CALIBRATION_MODEL), workload, seed, warmup_s=5.0)


def simulate_points(backend: SimBackend | None = None) -> list[tuple[Point, float]]:
    """(point, simulated value averaged over CALIBRATION_SEEDS) for every point
    (default: on the calibration profile, where they were measured)."""
    backend = backend or SimBackend(CALIBRATION_PROFILE)
    cache: dict[tuple[TrialKind, int, int], TrialResult] = {}

    def metric(kind: TrialKind, pct: int, name: str) -> float:
        values = []
        for seed in CALIBRATION_SEEDS:
            key = (kind, pct, seed)
            if key not in cache:
                cache[key] = backend.run_trial(calibration_spec(kind, pct, seed))
            values.append(cache[key].metrics()[name])
        return float(np.mean(values))

    return [(p, metric(p.kind, p.thread_pct, p.metric)) for p in POINTS]


def table(rows: list[tuple[Point, float]]) -> str:
    lines = [f"{'measurement':<24} {'metric':<20} {'target':>8} {'sim':>8} {'error':>7}"]
    for p, v in rows:
        lines.append(f"{p.name:<24} {p.metric:<20} {p.target:>8.2f} {v:>8.2f} {v / p.target - 1:>+7.1%}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    backend = SimBackend(argv[0] if argv else CALIBRATION_PROFILE)
    print(f"profile {backend.profile.source}: {backend.profile.status}")
    print(table(simulate_points(backend)))


if __name__ == "__main__":
    main(sys.argv[1:])
