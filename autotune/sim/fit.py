"""Fitting a profile's measured numbers to trial-level measurements.

A ``Target`` is one number measured on the GPU for one trial spec (the P50
TPOT of a serving-alone run, the trainer-alone samples/s). A ``Param`` names
the profile fields to fit: one field set to a value, or several fields
scaled by one common factor (the trainer's host times keep their
forward/backward split). ``fit`` minimises the weighted sum of squared log
errors, sim / target, by coordinate-wise golden-section search: a handful of
parameters, each with a physical range, and a simulator that is cheap to run.

Held-out rows must not be targets: a fit says what it used (``Fit.targets``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from autotune.sim.profile import MEASURED_SECTIONS, Profile
from autotune.trial import TrialResult, TrialSpec

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class Target:
    name: str  # what was measured: "serving alone, fig8a 24 req/s"
    spec: TrialSpec
    metric: str  # key of TrialResult.metrics(): "tpot_p50_ms"
    value: float  # measured
    weight: float = 1.0


@dataclass(frozen=True)
class Param:
    name: str  # "trainer host time scale"
    fields: tuple[str, ...]  # "section.field", each in a measured section
    low: float
    high: float
    scale: bool = False  # True: the value multiplies each field's value in the base profile

    def apply(self, base: Profile, value: float) -> dict[str, float]:
        out = {}
        for key in self.fields:
            section, field = key.split(".")
            out[key] = getattr(getattr(base, section), field) * value if self.scale else value
        return out


@dataclass(frozen=True)
class Fit:
    profile: Profile
    values: Mapping[str, float]  # Param.name -> fitted value
    fields: Mapping[str, float]  # "section.field" -> its fitted number
    loss: float
    residuals: Mapping[str, float]  # Target.name + metric -> sim / target - 1
    targets: tuple[str, ...]


def with_fields(profile: Profile, fields: Mapping[str, float]) -> Profile:
    """The profile with the given measured-section fields replaced."""
    sections: dict[str, dict[str, float]] = {}
    for key, value in fields.items():
        section, field = key.split(".")
        if section not in MEASURED_SECTIONS:
            raise ValueError(f"{key}: only measured sections are fitted")
        sections.setdefault(section, {})[field] = value
    return replace(profile, **{s: replace(getattr(profile, s), **f) for s, f in sections.items()})


Runner = Callable[[Profile, TrialSpec], TrialResult]


def residuals(profile: Profile, targets: Sequence[Target], run: Runner) -> dict[str, float]:
    """sim / target - 1 for each target ("name: metric"), each trial spec simulated once."""
    results: dict[int, TrialResult] = {}
    out = {}
    for t in targets:
        if id(t.spec) not in results:
            results[id(t.spec)] = run(profile, t.spec)
        out[f"{t.name}: {t.metric}"] = results[id(t.spec)].metrics().get(t.metric, 0.0) / t.value - 1.0
    return out


def loss_of(targets: Sequence[Target], res: Mapping[str, float]) -> float:
    """The weighted sum of squared log errors that ``fit`` minimises."""
    return sum(t.weight * math.log(max(1e-9, 1.0 + res[f"{t.name}: {t.metric}"])) ** 2 for t in targets)


def fit(base: Profile, targets: Sequence[Target], params: Sequence[Param], run: Runner,
        sweeps: int = 3, steps: int = 14) -> Fit:
    """Fit ``params`` so the simulator (``run``) reproduces ``targets``."""
    assert targets and params
    values = {p.name: (p.low + p.high) / 2 if not p.scale else 1.0 for p in params}

    def profile_of(vals: Mapping[str, float]) -> Profile:
        fields: dict[str, float] = {}
        for p in params:
            fields.update(p.apply(base, vals[p.name]))
        return with_fields(base, fields)

    def loss(vals: Mapping[str, float]) -> float:
        return loss_of(targets, residuals(profile_of(vals), targets, run))

    for _ in range(sweeps):
        for p in params:
            lo, hi = p.low, p.high
            a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
            fa, fb = loss({**values, p.name: a}), loss({**values, p.name: b})
            for _ in range(steps):
                if fa <= fb:
                    hi, b, fb = b, a, fa
                    a = hi - _GOLDEN * (hi - lo)
                    fa = loss({**values, p.name: a})
                else:
                    lo, a, fa = a, b, fb
                    b = lo + _GOLDEN * (hi - lo)
                    fb = loss({**values, p.name: b})
            values[p.name] = (lo + hi) / 2
    prof = profile_of(values)
    fields: dict[str, float] = {}
    for p in params:
        fields.update(p.apply(base, values[p.name]))
    res = residuals(prof, targets, run)
    return Fit(prof, dict(values), fields, loss_of(targets, res), res, tuple(t.name for t in targets))
