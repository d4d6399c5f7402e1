"""Optuna samplers by name. Constraints reach every sampler through
``trial.set_constraint`` (Optuna 5), so none is given a ``constraints_func``."""

from __future__ import annotations

import optuna

from autotune.errors import UserError
from autotune.knobs import SearchSpace

SAMPLERS = ("gp", "tpe", "random", "grid")
#: Chosen by benchmarks/search_quality.py (benchmarks/results/search_quality.md):
#: over the 9 (system, rate) cells where the knobs bind, TPE's median best after
#: 40 trials reached >= 0.97 of the optimum in 7 (worst 0.944), GP in 6 (worst
#: 0.906), random search in 6 (worst 0.931); TPE also needs no PyTorch.
DEFAULT_SAMPLER = "tpe"
#: Random trials before a model-based sampler takes over (the first is the
#: artifact's example setting).
N_STARTUP_TRIALS = 8
#: Points per continuous knob in grid search.
GRID_POINTS = 9


def make_sampler(name: str, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler. ``seed`` should differ between resumed runs of one
    study, so a resumed random phase does not repeat the first run's points."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=N_STARTUP_TRIALS)
    if name == "gp":
        try:
            import scipy  # noqa: F401  (GPSampler's dependencies)
            import torch  # noqa: F401
        except ImportError as e:
            raise UserError(f"--sampler gp needs PyTorch and SciPy ({e.name} is missing): "
                            "pip install 'autotune[gp]' (the CPU build of PyTorch is enough)") from None
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=N_STARTUP_TRIALS)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(GRID_POINTS), seed=seed)
    raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
