"""Optuna samplers by name. Constraints reach every sampler through
``trial.set_constraint`` (Optuna 5), so none is given a ``constraints_func``.
Every one of them takes a multi-objective study (``--objective pareto``) as
well: Optuna 5's GPSampler handles several objectives and constraints."""

from __future__ import annotations

import optuna

from autotune.errors import UserError
from autotune.knobs import SearchSpace

SAMPLERS = ("gp", "tpe", "nsga2", "random", "grid")
#: Chosen by benchmarks/search_quality.py (benchmarks/results/search_quality.md):
#: at the default SLOs (fig8a, 4/8/16 req/s) TPE's median best after 40 trials
#: reached >= 0.97 of the optimum in 11/11 cells (worst 0.991), GP 11/11
#: (1.000), random search 8/11 (worst 0.939); under 1.25x/1.1x SLOs TPE 7/9
#: (worst 0.944), GP 6/9 (worst 0.906), random 6/9 (worst 0.931). TPE also
#: needs no PyTorch, and GP doubles a 40-trial study's wall time.
DEFAULT_SAMPLER = "tpe"
#: Random trials before a model-based sampler takes over (the first is the
#: artifact's example setting).
N_STARTUP_TRIALS = 8
#: NSGA-II's generation size: small, so that a study of 20 to 40 trials
#: evolves past its random first generation (Optuna's default is 50).
NSGA2_POPULATION = N_STARTUP_TRIALS
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
    if name == "nsga2":  # made for several objectives (--objective pareto); works with one too
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(GRID_POINTS), seed=seed)
    raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
