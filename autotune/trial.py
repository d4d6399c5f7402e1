"""A trial: (system, knob values, workload, model) -> measurements.

``TrialSpec`` is everything a backend needs to run one trial; ``TrialResult``
is what it measured. Backends (``autotune.backends``) turn one into the other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autotune.metrics import PeftMetrics, ServingMetrics, TrialMetrics
from autotune.models import ModelConfig
from autotune.policy import SharingPolicy
from autotune.workloads.spec import Workload


class Outcome(enum.StrEnum):
    """How a trial of a study ended, as stored with it and written to ``--json``."""

    FEASIBLE = "feasible"  # measured; both P99s within the SLO, no request failed
    INFEASIBLE = "infeasible"  # measured; misses the SLO
    CRASHED = "crashed"  # the backend could not measure it (the reason is stored)
    FAILED = "failed"  # its worker died, or it was not stored whole: never counted feasible
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM during its measurement
    RUNNING = "running"  # in flight (another worker's, or one to be failed at the next start)


class TrialKind(str, enum.Enum):
    COLOCATED = "colocated"  # server and trainer share the GPU under the policy
    SERVING_ALONE = "serving_alone"  # reference for relative SLOs
    TRAINER_ALONE = "trainer_alone"  # the PEFT ceiling; fig12 (no serving)


@dataclass(frozen=True)
class LoraServing:
    """LoRA adapters the server serves (fig13)."""

    num_adapters: int  # adapters loaded on the server
    rank: int


@dataclass(frozen=True)
class TrialSpec:
    kind: TrialKind
    system: str  # the system whose policy applies (its memory split also in references)
    params: Mapping[str, float]
    policy: SharingPolicy
    model: ModelConfig
    workload: Workload | None  # None: no serving
    seed: int  # for the backend's own random sources (noise, prompt token ids)
    lora_serving: LoraServing | None = None
    trainer_lora_rank: int = 8
    warmup_s: float = 0.0  # trainer iterations before this are not counted
    number: int | None = None  # the study's trial number, for logs
    label: str | None = None  # names the trial's log folder where ``number`` does not (confirmation runs)

    @property
    def trains(self) -> bool:
        return self.kind is not TrialKind.SERVING_ALONE

    @property
    def serves(self) -> bool:
        return self.kind is not TrialKind.TRAINER_ALONE and self.workload is not None


@dataclass(frozen=True)
class TrialResult:
    serving: ServingMetrics | None
    peft: PeftMetrics | None
    error: str | None = None  # why the trial produced no valid measurement
    wall_s: float = 0.0  # how long the trial took to run, s
    notes: tuple[str, ...] = ()  # e.g. "MPS off (--no-mps)"
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend-specific figures

    @property
    def crashed(self) -> bool:
        return self.error is not None

    def measured(self) -> TrialMetrics:
        """What it measured, nested, as a study stores it: the backend's
        numeric extras apart from serving and PEFT."""
        backend = {k: float(v) for k, v in self.extra.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return TrialMetrics(serving=self.serving, peft=self.peft, wall_s=self.wall_s, backend=backend)

    def metrics(self) -> dict[str, float]:
        """``measured()`` flat, with units in the names (``ttft_p99_ms``,
        ``peft_samples_per_s``): what fits and tables look metrics up by."""
        return self.measured().flat()

    @classmethod
    def crash(cls, reason: str, wall_s: float = 0.0) -> TrialResult:
        return cls(serving=None, peft=None, error=reason, wall_s=wall_s)
