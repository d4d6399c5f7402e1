"""Results as plain data, rebuilt from a study alone.

The CLI's table and summary, the ``--json`` file and the notebooks all read
these objects (compute first, draw second).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import optuna

from autotune.errors import EnvironmentFailure, UserError, os_error
from autotune.records import (CANDIDATES, CONFIRM_SEEDS_ATTR, Confirmation, TrialRow, load_confirmations,
                              reference_metrics, search_space_record, setting_records, verdict)
from autotune.storage import open_storage

def ranked_feasible(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Feasible trials, highest PEFT throughput first (lowest number on ties)."""
    return sorted((r for r in rows if r.feasible), key=lambda r: (-r.peft_samples_per_s, r.number))


def best_feasible(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The feasible trial with the highest PEFT throughput (lowest number on
    ties): a study's answer, and its point in a figure; None where no trial
    met the SLO. For a study of one objective it is the trial Optuna's
    feasibility-aware ``study.best_trial`` returns (the conformance suite
    checks it on every storage kind); it is computed from rows because the
    live table, the figures and the confirmation ranking read rows, not a
    study, and a pareto study has no ``best_trial``."""
    ranked = ranked_feasible(rows)
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class StudyResult:
    study_name: str
    config: dict[str, Any]
    slo: dict[str, Any] | None  # resolved limits in ms and their basis
    references: dict[str, Any]
    rows: tuple[TrialRow, ...] = field(default=())
    confirmations: dict[int, list[Confirmation]] = field(default_factory=dict)  # by trial number
    confirm_seeds: tuple[int, ...] = ()  # workload seeds of the latest --confirm (empty: never asked)
    objective: str = "peft"  # peft | pareto (autotune.study.OBJECTIVES)
    pareto_numbers: tuple[int, ...] = ()  # pareto: Optuna's study.best_trials (feasible, non-dominated)
    search_space: dict[str, dict[str, Any]] | None = None  # knob -> its range as data (records.search_space_record)

    @property
    def trainer_alone_samples_per_s(self) -> float | None:
        """The PEFT ceiling: the trainer-alone reference's samples/s (None: not run)."""
        record = self.references.get("trainer_alone")
        return None if record is None else reference_metrics(record).peft_samples_per_s

    @property
    def confirm_workloads(self) -> int:
        return len(self.confirm_seeds)

    def ranked_feasible(self) -> list[TrialRow]:
        """Feasible trials, highest PEFT throughput first (lowest number on ties)."""
        return ranked_feasible(self.rows)

    @property
    def best(self) -> TrialRow | None:
        """The feasible trial with the highest PEFT throughput (lowest number on ties)."""
        return best_feasible(self.rows)

    @property
    def pareto_optimal(self) -> list[TrialRow]:
        """A pareto study's Pareto-optimal trials (Optuna's ``best_trials``:
        feasible, none beaten on PEFT samples/s, P99 TTFT and P99 TPOT at
        once), highest PEFT throughput first; empty for a study of one
        objective, or where no trial met the SLO."""
        numbers = set(self.pareto_numbers)
        return [r for r in ranked_feasible(self.rows) if r.number in numbers]

    def confirmed(self, row: TrialRow) -> bool | None:
        """Whether ``row``'s setting met the SLO on every fresh workload asked
        for (None: not confirmed, or confirmation never asked)."""
        if not self.confirm_workloads:
            return None
        return verdict(setting_records(self.rows, self.confirmations, row.params), self.confirm_seeds)

    @property
    def recommended(self) -> TrialRow | None:
        """The answer: without confirmation, ``best``; with it, the best feasible
        trial whose setting also met the SLO on all the fresh workloads."""
        if not self.confirm_workloads:
            return self.best
        return next((r for r in self.ranked_feasible() if self.confirmed(r)), None)

    @classmethod
    def of(cls, study: optuna.Study) -> StudyResult:
        attrs = study.user_attrs
        return cls(
            study_name=study.study_name,
            config=dict(attrs.get("config", {})),
            slo=attrs.get("slo"),
            references=dict(attrs.get("references", {})),
            rows=tuple(TrialRow.of(t) for t in study.get_trials(deepcopy=False)),
            confirmations=load_confirmations(attrs),
            confirm_seeds=tuple(int(x) for x in attrs.get(CONFIRM_SEEDS_ATTR, ())),
            objective="pareto" if len(study.directions) > 1 else "peft",
            pareto_numbers=tuple(sorted(t.number for t in study.best_trials)) if len(study.directions) > 1 else (),
            search_space=search_space_record(attrs),
        )

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        best = self.best
        backend = cfg.get("backend") or {}
        return {
            "schema_version": SCHEMA_VERSION,
            "versions": versions(),
            "study_name": self.study_name,
            "system": cfg.get("system"),
            "figure": cfg.get("figure"),
            "rate_req_s": cfg.get("rate_req_s"),
            "rate_basis": cfg.get("rate_basis"),
            "backend": cfg.get("backend", {}).get("backend"),
            "backend_info": cfg.get("backend"),
            "hardware": backend.get("hardware"),
            "server_flags": backend.get("server_flags"),  # the GPU backend's last server; None on the simulator
            "model": cfg.get("model"),
            "workload": cfg.get("workload"),
            "synthetic_workload": cfg.get("synthetic_workload"),
            "num_prompts": cfg.get("num_prompts"),
            "search_space": self.search_space,
            "slo": self.slo,
            "objective": self.objective,
            "reference": {k: reference_metrics(v).to_dict() for k, v in self.references.items()},
            "best": None if best is None else self._answer(best),
            **({"pareto_optimal": [self._answer(r) for r in self.pareto_optimal]} if self.objective == "pareto"
               else {}),
            "confirmation": None if not self.confirm_workloads else {
                "workloads": self.confirm_workloads,
                "workload_seeds": list(self.confirm_seeds),
                "candidates": CANDIDATES,
                "recommended": None if self.recommended is None else self._answer(self.recommended),
                "runs": {str(k): [c.to_dict() for c in v] for k, v in sorted(self.confirmations.items())},
            },
            "trials": [r.to_dict() for r in self.rows],
        }

    def _answer(self, row: TrialRow) -> dict[str, Any]:
        return {"number": row.number, "params": row.params, "metrics": row.metrics.to_dict(), "feasible": True,
                "confirmed": self.confirmed(row)}


#: Version of the ``--json`` layout (``schemas/study_result.json``); raised on any change a reader must know.
SCHEMA_VERSION = 2


def versions() -> dict[str, str]:
    """The tool's and its libraries' versions, for a results file."""
    out = {"python": platform.python_version()}
    for dist in ("autotune", "optuna", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def schema() -> dict[str, Any]:
    """The JSON Schema of a ``--json`` file."""
    return json.loads(resources.files("autotune.schemas").joinpath("study_result.json").read_text(encoding="utf-8"))


def write_json(result: StudyResult, path: Path) -> None:
    """Write atomically: an existing file is replaced whole or not at all."""
    path = Path(path)
    written = {"written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result.to_dict()}
    text = json.dumps(_finite(written), indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, f"cannot write {path}") from None


def check_json_path(path: Path, flag: str = "--json", made: Path | None = None) -> None:
    """Before any work: ``write_json`` will be able to write ``path``. A
    folder, or a file in a folder that does not exist, is bad input; a
    folder that cannot be written is the environment's failure. ``made``: a
    folder the command makes (and checks) before it writes ``path``."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if made is not None and not parent.exists() and parent.resolve() == Path(made).resolve():
        return
    if not parent.exists():
        raise UserError(f"{flag} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"{flag} {path}: folder {parent} is not writable")


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def tradeoff_curve(rows: Sequence[TrialRow], latency: str = "tpot_p99_ms",
                   throughput: str = "peft_samples_per_s") -> list[TrialRow]:
    """The trade-off curve of one latency against PEFT throughput: measured
    trials, feasible or not, that no other beats on both higher throughput
    and lower ``latency``, sorted by throughput (what Figure 10 draws, the
    SLO line showing where it crosses the limit). Crashed trials are left
    out. Not to be confused with ``StudyResult.pareto_optimal``: feasible
    trials only, on all three objectives at once."""
    values = {r.number: (r.metrics.value(throughput), r.metrics.value(latency)) for r in rows if r.measured}
    pts = [r for r in rows if r.number in values and None not in values[r.number]]
    front = [
        r for r in pts
        if not any(
            values[o.number][0] >= values[r.number][0] and values[o.number][1] <= values[r.number][1]
            and values[o.number] != values[r.number]
            for o in pts
        )
    ]
    return sorted(front, key=lambda r: values[r.number][0])


def load_result(storage: str, study_name: str | None = None) -> StudyResult:
    """For notebooks: the result of a stored study (``study_name`` None: the
    storage's only study, as in a file of ``autotune figure``'s ``studies/``)."""
    backing = open_storage(storage)
    if study_name is None:
        names = optuna.get_all_study_names(backing)
        if len(names) != 1:
            raise UserError(f"{storage} holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
        study_name = names[0]
    try:
        study = optuna.load_study(study_name=study_name, storage=backing)
    except KeyError:
        raise UserError(f"no study named {study_name!r} in {storage}") from None
    return StudyResult.of(study)


def load_study_file(path: Path) -> StudyResult:
    """The result of the one study in a SQLite file (``autotune figure``'s ``OUT/studies/STUDY.db``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no study database at {path}")
    return load_result(f"sqlite:///{path}")


def format_params(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return f"{v:.4g}"


def summary_text(result: StudyResult) -> str:
    """The end-of-study answer, as the artifact would state it."""
    cfg = result.config
    backend = cfg.get("backend", {})
    lines = [f"study {result.study_name}: {len(result.rows)} trials "
             f"({cfg.get('system')}, {cfg.get('figure')}, {cfg.get('rate_req_s', 0):g} req/s, "
             f"{backend.get('backend')} backend)"]
    if backend.get("profile_status") == "modelled":  # say it where the answer is read
        lines.append(f"hardware: {backend.get('hardware')}, modelled (not measured): {backend.get('provenance')}")
    if result.slo:
        lines.append(f"SLO: P99 TTFT <= {result.slo['ttft_p99_ms']:.1f} ms ({result.slo['ttft_basis']}), "
                     f"P99 TPOT <= {result.slo['tpot_p99_ms']:.2f} ms ({result.slo['tpot_basis']})")
    best = result.best
    if best is None:
        lines.append("no setting meets the SLO; PEFT throughput counts as 0")
        return "\n".join(lines)
    lines += _setting_lines(result, best, "best")
    if result.objective == "pareto":
        front = result.pareto_optimal
        lines.append(f"Pareto-optimal feasible trials ({len(front)}; max PEFT samples/s, min P99 TTFT and TPOT):")
        lines += [f"  #{r.number}: {_measured(r)}; {format_params(r.params)}" for r in front]
    n = result.confirm_workloads
    if not n:
        return "\n".join(lines)
    tried = [r for r in result.ranked_feasible() if result.confirmations.get(r.number)]
    lines.append(f"confirmation on {n} fresh workload{'s' if n > 1 else ''} (same SLO in ms):")
    for r in tried:
        runs = "; ".join(_confirmation_text(c) for c in result.confirmations[r.number])
        verdict_text = {True: "confirmed", False: "missed", None: "unfinished"}[result.confirmed(r)]
        lines.append(f"  trial {r.number}: {verdict_text} ({runs})")
    rec = result.recommended
    if rec is None:
        where = "the fresh workload" if n == 1 else f"all {n} fresh workloads"
        lines.append(f"no setting met the SLO on {where}; rerun with more --trials, or loosen the SLO")
    elif rec.number != best.number:
        lines += _setting_lines(result, rec, "recommended")
    else:
        lines.append(f"recommended: trial {rec.number}, as above")
    return "\n".join(lines)


def _measured(row: TrialRow) -> str:
    m = row.metrics
    text = f"PEFT {row.peft_samples_per_s:.3f} samples/s"
    if m.serving is not None:
        text += f", P99 TTFT {m.ttft_p99_ms:.1f} ms, P99 TPOT {m.tpot_p99_ms:.2f} ms"
    return text


def _setting_lines(result: StudyResult, row: TrialRow, title: str) -> list[str]:
    m = row.metrics
    lines = [f"{title} (trial {row.number}): {format_params(row.params)}"]
    tokens_per_s = m.peft.peft_tokens_per_s if m.peft is not None else 0.0
    detail = f"  PEFT {row.peft_samples_per_s:.3f} samples/s ({tokens_per_s:.0f} tokens/s)"
    if m.serving is not None:
        detail += f"; P99 TTFT {m.ttft_p99_ms:.1f} ms, P99 TPOT {m.tpot_p99_ms:.2f} ms"
    lines.append(detail)
    ceiling = result.trainer_alone_samples_per_s
    if ceiling:
        lines.append(f"  = {row.peft_samples_per_s / ceiling:.0%} of the trainer alone ({ceiling:.3f} samples/s)")
    return lines


def _confirmation_text(c: Confirmation) -> str:
    return c.measured_text() if c.error is not None else f"{c.measured_text()}, {c.outcome}"
