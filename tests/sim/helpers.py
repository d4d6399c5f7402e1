"""Builders for the simulator's tests: small workloads and trial specs."""

from __future__ import annotations

import numpy as np
from autotune.models import from_name
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialSpec
from autotune.workloads.spec import RequestSpec, Workload

MODEL = from_name("llama-3.1-8b")


def poisson_workload(rate_req_s: float, n: int, seed: int = 0, prompt_len: int | None = None,
                     output_len: int | None = None) -> Workload:
    """Poisson arrivals; fixed lengths when given, else ShareGPT-like lognormal ones."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_req_s, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    if prompt_len is None:
        prompts = np.clip(rng.lognormal(np.log(170), 0.8, n), 4, 1024).astype(int)
    else:
        prompts = np.full(n, prompt_len)
    if output_len is None:
        outputs = np.clip(rng.lognormal(np.log(150), 0.8, n), 4, None).astype(int)
        outputs = np.minimum(outputs, 2048 - prompts)
    else:
        outputs = np.full(n, output_len)
    reqs = tuple(RequestSpec(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs))
    return Workload(reqs, rate_req_s, seed, True, "test workload")


def spaced_workload(n: int, gap_s: float, prompt_len: int = 200, output_len: int = 50) -> Workload:
    reqs = tuple(RequestSpec(i * gap_s, prompt_len, output_len) for i in range(n))
    return Workload(reqs, 1.0 / gap_s, 0, True, "spaced")


def spec_for(system: str, params: dict | None = None, workload: Workload | None = None,
             kind: TrialKind = TrialKind.COLOCATED, seed: int = 0, warmup_s: float = 2.0, **kw) -> TrialSpec:
    s = get_system(system)
    p = {**s.default_params(), **(params or {})}
    return TrialSpec(kind, system, p, s.policy(p), kw.pop("model", MODEL), workload, seed, warmup_s=warmup_s, **kw)
