"""Results as plain data, rebuilt from a study alone.

The CLI's table and summary, the ``--json`` file and the notebooks all read
these objects (compute first, draw second).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autotune.errors import UserError

_CONSTRAINT_PREFIX = "constraints:"


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # Optuna's: COMPLETE, FAIL, RUNNING, ...
    outcome: str  # feasible | infeasible | crashed | interrupted | running
    params: dict[str, float]
    metrics: dict[str, float]
    constraints: dict[str, float]  # signed relative margins, <= 0 met
    error: str | None = None

    @property
    def feasible(self) -> bool:
        return self.outcome == "feasible"

    @property
    def peft_samples_per_s(self) -> float:
        return self.metrics.get("peft_samples_per_s", 0.0)

    @classmethod
    def of(cls, t: optuna.trial.FrozenTrial) -> TrialRow:
        constraints = {
            k.removeprefix(_CONSTRAINT_PREFIX): float(v)
            for k, v in t.system_attrs.items()
            if k.startswith(_CONSTRAINT_PREFIX)
        }
        if t.state == optuna.trial.TrialState.RUNNING:
            outcome = "running"
        else:
            outcome = t.user_attrs.get("outcome", "failed")
        return cls(
            number=t.number,
            state=t.state.name,
            outcome=outcome,
            params=dict(t.params),
            metrics=dict(t.user_attrs.get("metrics", {})),
            constraints=constraints,
            error=t.user_attrs.get("error"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state,
            "outcome": self.outcome,
            "params": self.params,
            "metrics": self.metrics,
            "constraints": self.constraints,
            "error": self.error,
        }


@dataclass(frozen=True)
class StudyResult:
    study_name: str
    config: dict[str, Any]
    slo: dict[str, Any] | None  # resolved limits in ms and their basis
    references: dict[str, Any]
    rows: tuple[TrialRow, ...] = field(default=())

    @property
    def best(self) -> TrialRow | None:
        """The feasible trial with the highest PEFT throughput (lowest number on ties)."""
        feasible = [r for r in self.rows if r.feasible]
        return max(feasible, key=lambda r: (r.peft_samples_per_s, -r.number), default=None)

    @classmethod
    def of(cls, study: optuna.Study) -> StudyResult:
        attrs = study.user_attrs
        return cls(
            study_name=study.study_name,
            config=dict(attrs.get("config", {})),
            slo=attrs.get("slo"),
            references=dict(attrs.get("references", {})),
            rows=tuple(TrialRow.of(t) for t in study.get_trials(deepcopy=False)),
        )

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        best = self.best
        return {
            "study_name": self.study_name,
            "system": cfg.get("system"),
            "figure": cfg.get("figure"),
            "rate_req_s": cfg.get("rate_req_s"),
            "rate_basis": cfg.get("rate_basis"),
            "backend": cfg.get("backend", {}).get("backend"),
            "backend_info": cfg.get("backend"),
            "model": cfg.get("model"),
            "workload": cfg.get("workload"),
            "synthetic_workload": cfg.get("synthetic_workload"),
            "num_prompts": cfg.get("num_prompts"),
            "search_space": cfg.get("search_space"),
            "slo": self.slo,
            "reference": {k: v.get("metrics") for k, v in self.references.items()},
            "best": None if best is None else {
                "number": best.number,
                "params": best.params,
                "metrics": best.metrics,
                "feasible": True,
            },
            "trials": [r.to_dict() for r in self.rows],
        }


def write_json(result: StudyResult, path: Path) -> None:
    """Write atomically: an existing file is replaced whole or not at all."""
    path = Path(path)
    text = json.dumps(_finite(result.to_dict()), indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def pareto_front(rows: Sequence[TrialRow], latency: str = "tpot_p99_ms",
                 throughput: str = "peft_samples_per_s") -> list[TrialRow]:
    """Trials no other trial beats on both higher throughput and lower latency,
    sorted by throughput. Crashed trials are left out."""
    pts = [r for r in rows if r.outcome in ("feasible", "infeasible") and latency in r.metrics]
    front = [
        r for r in pts
        if not any(
            o.metrics[throughput] >= r.metrics[throughput] and o.metrics[latency] <= r.metrics[latency]
            and (o.metrics[throughput] > r.metrics[throughput] or o.metrics[latency] < r.metrics[latency])
            for o in pts
        )
    ]
    return sorted(front, key=lambda r: r.metrics[throughput])


def load_result(storage: str, study_name: str) -> StudyResult:
    """For notebooks: the result of a stored study."""
    from autotune.study import open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise UserError(f"no study named {study_name!r} in {storage}") from None
    return StudyResult.of(study)


def format_params(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return f"{v:.4g}"


def summary_text(result: StudyResult) -> str:
    """The end-of-study answer, as the artifact would state it."""
    cfg = result.config
    lines = [f"study {result.study_name}: {len(result.rows)} trials "
             f"({cfg.get('system')}, {cfg.get('figure')}, {cfg.get('rate_req_s', 0):g} req/s, "
             f"{cfg.get('backend', {}).get('backend')} backend)"]
    if result.slo:
        lines.append(f"SLO: P99 TTFT <= {result.slo['ttft_p99_ms']:.1f} ms ({result.slo['ttft_basis']}), "
                     f"P99 TPOT <= {result.slo['tpot_p99_ms']:.2f} ms ({result.slo['tpot_basis']})")
    best = result.best
    if best is None:
        lines.append("no setting meets the SLO; PEFT throughput counts as 0")
        return "\n".join(lines)
    m = best.metrics
    lines.append(f"best (trial {best.number}): {format_params(best.params)}")
    detail = f"  PEFT {m.get('peft_samples_per_s', 0):.3f} samples/s ({m.get('peft_tokens_per_s', 0):.0f} tokens/s)"
    if "ttft_p99_ms" in m:
        detail += f"; P99 TTFT {m['ttft_p99_ms']:.1f} ms, P99 TPOT {m['tpot_p99_ms']:.2f} ms"
    lines.append(detail)
    ceiling = result.references.get("trainer_alone", {}).get("metrics", {}).get("peft_samples_per_s")
    if ceiling:
        lines.append(f"  = {m.get('peft_samples_per_s', 0) / ceiling:.0%} of the trainer alone ({ceiling:.3f} samples/s)")
    return "\n".join(lines)
