"""A sampler wrapper that does not propose a setting the study already has.

Workers of one study sample at once: with the same sampler they propose the
same settings, each a wasted trial (a wasted minute on a GPU). Each worker's
sampler has its own seed (``sampler_seed``), and ``DistinctSampler`` draws
every knob of a trial jointly from the wrapped sampler and draws again while
the setting is one that a COMPLETE, RUNNING or WAITING trial of the study
already has (a RUNNING one: another worker is measuring it now). After
``MODEL_DRAWS`` draws from the wrapped sampler it draws uniformly with its
own generator; a space with every setting taken (a single knob of 19 steps,
40 trials) gets a repeat, there is nothing else to try.

A trial queued with its settings (the artifact's example, a dead worker's
trial run again) keeps them: Optuna never asks the sampler for those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

#: Draws from the wrapped sampler before uniform ones (GPSampler's cost a draw).
MODEL_DRAWS = 4
#: Uniform draws after those.
UNIFORM_DRAWS = 64
#: Trials whose settings are taken.
TAKEN_STATES = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
#: Seeds NumPy takes.
_SEED_MOD = 2**32


def sampler_seed(seed: int, worker_id: int, trials_stored: int) -> int:
    """A worker's sampler seed: worker 0 keeps the one-process seed (``seed
    + 1000 x trials stored``, so that a resumed random phase does not repeat
    the first run's), every other worker one of its own from (seed, worker, trials)."""
    if worker_id == 0:
        return (seed + 1000 * trials_stored) % _SEED_MOD
    return int(np.random.SeedSequence([seed, trials_stored, worker_id]).generate_state(1)[0])


def setting_key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A setting as a hashable value (floats by their exact repr)."""
    return tuple(sorted((k, repr(float(v)) if isinstance(v, (int, float)) else repr(v)) for k, v in params.items()))


def repeated_settings(trials: Sequence[FrozenTrial]) -> int:
    """COMPLETE trials whose setting an earlier COMPLETE trial had (the
    measure of wasted trials)."""
    seen: set = set()
    repeats = 0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE:
            continue
        key = setting_key(t.params)
        repeats += key in seen
        seen.add(key)
    return repeats


class DistinctSampler(optuna.samplers.BaseSampler):
    def __init__(self, inner: optuna.samplers.BaseSampler, space: Mapping[str, BaseDistribution], seed: int) -> None:
        self.inner = inner
        self.space = dict(space)
        self._uniform = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.space)  # every knob at once, so a setting is judged whole

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        taken = {setting_key(t.params) for t in study.get_trials(deepcopy=False, states=TAKEN_STATES)
                 if t.number != trial.number and set(t.params) == set(search_space)}
        params: dict[str, Any] = {}
        for draw in range(MODEL_DRAWS + UNIFORM_DRAWS):
            sampler = self.inner if draw < MODEL_DRAWS else self._uniform
            params = _draw(sampler, study, trial, search_space)
            if setting_key(params) not in taken:
                return params
        return params  # every setting tried is taken: a repeat

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
        self._uniform.reseed_rng()


def _draw(sampler: optuna.samplers.BaseSampler, study: optuna.Study, trial: FrozenTrial,
          space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """One joint draw of every knob: the sampler's relative (multivariate)
    part, the rest knob by knob."""
    relative_space = {k: v for k, v in sampler.infer_relative_search_space(study, trial).items() if k in space}
    params = dict(sampler.sample_relative(study, trial, relative_space)) if relative_space else {}
    for name, dist in space.items():
        if name not in params:
            params[name] = sampler.sample_independent(study, trial, name, dist)
    return params
