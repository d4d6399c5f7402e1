"""The embedded simulator as a backend: ``--backend sim`` (the default)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from autotune.backends._base import Backend, ProgressFn, no_progress
from autotune.errors import TrialCrash, UserError
from autotune.metrics import peft_metrics, serving_metrics
from autotune.sim.profile import Profile, load_profile
from autotune.sim.simulation import Simulation, SimOutcome
from autotune.trial import TrialResult, TrialSpec


class SimBackend(Backend):
    """Runs trials on a discrete-event model of the server, the trainer and
    the sharing policy, with costs from a profile (``autotune/sim/profiles``).

    ``profile``: a packaged hardware profile's name (``--hardware``), a TOML
    file (``--profile``) or a ``Profile`` (a fit in progress); ``gpus``: override the profile's GPU count
    (``--gpus``). ``noise``: relative standard deviation of a multiplicative
    lognormal on every iteration and tasklet-segment time (0: exact); drawn
    from a generator seeded with ``spec.seed + seed_offset``, so a trial is
    deterministic per seed.
    """

    name = "sim"

    def __init__(self, profile: str | Path | Profile | None = None, noise: float = 0.0, seed_offset: int = 0,
                 gpus: int | None = None) -> None:
        if not 0.0 <= noise < 1.0:
            raise UserError(f"simulator noise must be in [0, 1), got {noise:g}")
        self.profile: Profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if gpus is not None:
            self.profile = self.profile.with_gpus(gpus)
        self.noise = float(noise)
        self.seed_offset = int(seed_offset)

    @property
    def hardware(self) -> str:
        return self.profile.name

    def describe(self) -> dict[str, Any]:
        d = self.profile.datasheet
        return {
            "backend": self.name,
            "hardware": self.hardware,
            "gpu": d.gpu,
            "gpus": d.gpus,
            "gpu_memory_gib": d.gpu_memory_gib,
            "interconnect": d.interconnect,
            "profile": self.profile.source,
            "profile_status": self.profile.status,
            "profile_digest": self.profile_digest(),
            "provenance": self.profile.provenance,
            "noise": self.noise,
            "seed_offset": self.seed_offset,
        }

    def headline(self) -> str:
        return f"simulated {self.hardware}: {self.profile.describe()}"

    def identity(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "profile_digest": self.profile_digest(), "gpus": self.profile.gpus,
                "noise": self.noise}

    def profile_digest(self) -> str:
        """Every number of the profile (GPU count included), hashed."""
        p = self.profile
        return hashlib.sha256(repr((p.datasheet, p.efficiency, p.serving, p.trainer, p.mps)).encode()).hexdigest()[:10]

    def cache_key(self) -> str:
        """Reference runs depend on every number of the profile and on the noise."""
        return f"{self.hardware}-sim-{self.profile_digest()}-noise{self.noise:g}"

    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        start = time.perf_counter()
        progress(0.0, "simulating")
        rng = None
        if self.noise > 0:
            rng = np.random.default_rng((spec.seed + self.seed_offset) % 2**63)
        try:
            outcome = Simulation(spec, self.profile, self.noise, rng, progress).run()
        except TrialCrash as e:
            return TrialResult.crash(str(e), time.perf_counter() - start)
        return self._result(spec, outcome, time.perf_counter() - start)

    def _result(self, spec: TrialSpec, outcome: SimOutcome, wall_s: float) -> TrialResult:
        serving = serving_metrics(outcome.records) if outcome.records else None
        peft = None
        if spec.trains and outcome.window_s is not None:
            peft = peft_metrics(outcome.iterations, *outcome.window_s)
        error = None
        if spec.serves and (serving is None or serving.completed == 0):
            error = "no request completed"
        extra = {
            "sim_events": outcome.events,
            "sim_server_iterations": outcome.server_iterations,
            "sim_preemptions": outcome.preemptions,
            "sim_clock_s": outcome.end_s,
        }
        notes = (f"simulated on {self.profile.source} ({self.profile.status})", *outcome.memory.notes)
        return TrialResult(serving=serving, peft=peft, error=error, wall_s=wall_s, notes=notes, extra=extra)
