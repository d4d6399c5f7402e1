"""A study's context: its config (``StudyConfig``), everything resolved from
it before the first trial (``StudyContext``), the hooks that watch it run
(``StudyObserver``), and the workload it replays.

``autotune.study`` builds the context and runs the trials; the confirmation
runner, the live table and the reporters read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from autotune.backends import Backend
from autotune.errors import UserError
from autotune.figures import FigurePreset
from autotune.knobs import SearchSpace
from autotune.metrics import TrialMetrics
from autotune.models import ModelConfig
from autotune.records import Confirmation
from autotune.samplers import DEFAULT_SAMPLER
from autotune.slo import ResolvedSlo, SloSpec
from autotune.systems import System
from autotune.trial import LoraServing
from autotune.workloads.build import WorkloadOptions, build_workload
from autotune.workloads.spec import Workload

DEFAULT_RUNS_DIR = Path("autotune-runs")


@dataclass(frozen=True)
class StudyConfig:
    system: str
    figure: str
    backend: str = "sim"
    rate_req_s: float | None = None  # None: the figure's rate for the backend's hardware
    num_prompts: int | None = None  # None: the figure's count
    model: str | None = None  # preset name or local path; None: the figure's
    slo: SloSpec = field(default_factory=SloSpec)
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    storage: str | None = None  # Optuna storage URL; None: SQLite under runs_dir
    study_name: str | None = None
    search_space_path: Path | None = None
    sharegpt_path: Path | None = None
    burstgpt_path: Path | None = None
    tokenizer_path: Path | None = None
    lora_dist: str | None = None  # fig13: uniform | skewed | none
    lora_rank: int = 8  # fig13: rank of the served adapters
    trial_seconds: float | None = None  # shorten the traffic window (s)
    warmup_s: float = 0.0  # trainer warm-up excluded from PEFT throughput
    confirm_workloads: int = 0  # fresh workloads the best settings must also meet the SLO on (autotune.confirm)
    runs_dir: Path = DEFAULT_RUNS_DIR
    objective: str = "peft"  # one of OBJECTIVES
    settings: tuple[dict[str, float], ...] = ()  # knob settings each run once, first (fig12's sweep)


@dataclass
class StudyContext:
    """Everything resolved from a config, before the first trial."""

    config: StudyConfig
    system: System
    figure: FigurePreset
    space: SearchSpace
    model: ModelConfig
    rate_req_s: float
    rate_basis: str  # "h100-80gb preset", "--rate"
    workload: Workload | None
    study: optuna.Study
    backend: Backend
    slo: ResolvedSlo | None = None
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage: optuna.storages.BaseStorage | None = None  # the study's, from open_storage

    @property
    def lora_serving(self) -> LoraServing | None:
        if self.figure.lora_adapters and self.config.lora_dist not in (None, "none"):
            return LoraServing(num_adapters=8, rank=self.config.lora_rank)
        return None


class StudyObserver:
    """Hooks with do-nothing defaults; the live table and the plain printer override them."""

    def on_start(self, ctx: StudyContext, n_trials: int) -> None: ...
    def on_reference(self, ctx: StudyContext, name: str, metrics: TrialMetrics, cached: bool) -> None: ...
    def on_trial_start(self, ctx: StudyContext, number: int, params: Mapping[str, float]) -> None: ...
    def on_progress(self, fraction: float, status: str) -> None: ...
    def on_trial_end(self, ctx: StudyContext, trial: optuna.trial.FrozenTrial) -> None: ...
    def on_confirm_start(self, ctx: StudyContext, number: int, params: Mapping[str, float], index: int,
                         n: int) -> None: ...
    def on_confirm_end(self, ctx: StudyContext, number: int, record: Confirmation) -> None: ...
    def on_end(self, ctx: StudyContext) -> None: ...


def study_workload(config: StudyConfig, figure: FigurePreset, system: System, rate: float) -> Workload | None:
    """The workload a study of ``config`` replays (None where the figure serves nothing)."""
    if not figure.serves:
        return None
    num_prompts = config.num_prompts or figure.prompts(rate, system.prompts_per_rate)
    lora_dist = (config.lora_dist or "uniform") if figure.lora_adapters else None
    workload = build_workload(
        WorkloadOptions(
            arrivals=figure.arrivals,
            rate_req_s=rate,
            num_prompts=num_prompts,
            seed=config.seed,
            sharegpt_path=config.sharegpt_path,
            burstgpt_path=config.burstgpt_path,
            tokenizer_path=config.tokenizer_path,
            lora_dist=lora_dist,
        )
    )
    if config.trial_seconds is not None:
        workload = workload.truncated(config.trial_seconds)
        if len(workload) == 0:
            raise UserError(f"--trial-seconds {config.trial_seconds:g} leaves no request of the workload")
    return workload


def build_workload_for(ctx: StudyContext, seed: int) -> Workload | None:
    """The study's workload (figure, rate, length, files) drawn with another seed."""
    return study_workload(replace(ctx.config, seed=seed), ctx.figure, ctx.system, ctx.rate_req_s)
