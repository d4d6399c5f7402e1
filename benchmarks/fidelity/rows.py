"""Settings, the trial specs a study builds for them, and the rows file.

A *setting* is one system's knob values on one figure at one rate. The GPU
script (``benchmarks/gpu/fidelity.py``) runs each setting a few times and
writes a *rows file*; the scorer (``benchmarks/fidelity/score.py``) runs the
simulator on the same specs. Both build specs here, with the study's own
functions, so that the GPU and the simulator see exactly what a study would
give them.

Rows file (JSON)::

    {"hardware", "machine", "command", "started", "settings": [...],
     "references": [{"key", "systems", "system", "figure", "rate_req_s", "workload_digest", "server",
                     "ttft_p99_ms", "tpot_p99_ms", "ttft_p50_ms", "tpot_p50_ms", ...,
                     optional "slo_for_workload_digests": the workloads whose rows it sets the SLO of
                     (default: its own; a study's --confirm runs, see benchmarks/fidelity/studies.py)}],
     "rows": [{"system", "figure", "rate_req_s", "params", "num_prompts", "trial_seconds",
               "runs": [{"run", "ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s", "ttft_p50_ms",
                         "tpot_p50_ms", "completed", "failed", "error", "wall_s"}]}]}

It is rewritten whole and atomically after every run, so a run killed midway
keeps everything measured before it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.figures import get_figure
from autotune.models import from_name
from autotune.context import StudyConfig, StudyContext, study_workload
from autotune.study import (
    _check_figure_options,
    _reference_spec,
    workload_digest,
    trial_spec,
)
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialResult, TrialSpec

DEFAULT_MODEL = "llama-3.1-8b"
_SETTING_KEYS = {"system", "figure", "rate_req_s", "params", "num_prompts", "trial_seconds", "model", "seed",
                 "held_out"}
#: Per-run figures kept in the rows file (``TrialResult.metrics()`` names).
RUN_METRICS = ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s", "ttft_p50_ms", "tpot_p50_ms")
REFERENCE_METRICS = ("ttft_p99_ms", "tpot_p99_ms", "ttft_p50_ms", "tpot_p50_ms")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One system's knob values on one figure at one rate (a row of the comparison)."""

    system: str
    figure: str
    rate_req_s: float
    params: Mapping[str, float] = field(default_factory=dict, hash=False)
    num_prompts: int | None = None  # None: the figure's count for the rate
    trial_seconds: float | None = None  # the workload truncated to this window; None: whole
    model: str = DEFAULT_MODEL
    seed: int = 0  # the workload's seed; the same for every run
    held_out: bool = True  # not used to fit the simulator's profile

    @classmethod
    def from_dict(cls, d: Any, where: str = "setting") -> Setting:
        """A checked setting; a UserError naming what is wrong otherwise."""
        if not isinstance(d, Mapping):
            raise UserError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - _SETTING_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
        missing = [k for k in ("system", "figure", "rate_req_s", "params") if k not in d]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
        system = get_system(str(d["system"]))
        figure = get_figure(str(d["figure"]))
        if not figure.serves:
            raise UserError(f"{where}: {figure.name} serves nothing; a fidelity row needs a serving figure")
        rate = _number(d["rate_req_s"], f"{where}: rate_req_s")
        if not (rate > 0 and math.isfinite(rate)):
            raise UserError(f"{where}: rate_req_s must be a positive number, got {rate:g}")
        if not isinstance(d["params"], Mapping):
            raise UserError(f"{where}: params must be an object of knob -> value")
        names = [k.name for k in system.knobs]
        extra = sorted(set(d["params"]) - set(names))
        absent = [n for n in names if n not in d["params"]]
        if extra or absent:
            raise UserError(f"{where}: {system.name} takes the knobs {', '.join(names)}"
                            + (f"; unknown: {', '.join(extra)}" if extra else "")
                            + (f"; missing: {', '.join(absent)}" if absent else ""))
        params: dict[str, float] = {}
        for knob in system.knobs:
            v = _number(d["params"][knob.name], f"{where}: {knob.name}")
            if not knob.min_allowed <= v <= knob.max_allowed:
                raise UserError(f"{where}: {knob.name} {v:g} is outside {knob.min_allowed:g}..{knob.max_allowed:g}")
            if knob.type == "int" and v != int(v):
                raise UserError(f"{where}: {knob.name} must be a whole number, got {v:g}")
            params[knob.name] = int(v) if knob.type == "int" else float(v)
        num_prompts = d.get("num_prompts")
        if num_prompts is not None and (not isinstance(num_prompts, int) or num_prompts < 1):
            raise UserError(f"{where}: num_prompts must be a whole number >= 1 or null, got {num_prompts!r}")
        trial_seconds = d.get("trial_seconds")
        if trial_seconds is not None:
            trial_seconds = _number(trial_seconds, f"{where}: trial_seconds")
            if not trial_seconds > 0:
                raise UserError(f"{where}: trial_seconds must be positive or null, got {trial_seconds:g}")
        model = str(d.get("model", DEFAULT_MODEL))
        from_name(model)  # a preset: the GPU backend serves it with dummy weights
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UserError(f"{where}: seed must be a whole number, got {seed!r}")
        held_out = d.get("held_out", True)
        if not isinstance(held_out, bool):
            raise UserError(f"{where}: held_out must be true or false, got {held_out!r}")
        return cls(system.name, figure.name, rate, params, num_prompts, trial_seconds, model, seed, held_out)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "figure": self.figure, "rate_req_s": self.rate_req_s,
                "params": dict(self.params), "num_prompts": self.num_prompts,
                "trial_seconds": self.trial_seconds, "model": self.model, "seed": self.seed,
                "held_out": self.held_out}

    @property
    def key(self) -> str:
        """Identifies the setting in a rows file (everything but ``held_out``)."""
        d = self.to_dict()
        del d["held_out"]
        return json.dumps(d, sort_keys=True)

    @property
    def slug(self) -> str:
        """Knob values in the system's knob order: ``forward_tasklets8-forward_wait_s0.005-...``."""
        order = [k.name for k in get_system(self.system).knobs]
        return "-".join(f"{name}{self.params[name]:g}" for name in order)

    def label(self, run: int) -> str:
        return f"{self.system}-{self.figure}-{self.rate_req_s:g}rps-{self.slug}-run{run}"

    def describe(self) -> str:
        return f"{self.system} {self.figure} {self.rate_req_s:g} req/s {self.slug}"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} must be a number, got {value!r}")
    return float(value)


def parse_settings(data: Any, where: str) -> list[Setting]:
    """Settings from a JSON list (or an object with a ``settings`` list, e.g. a rows file)."""
    if isinstance(data, Mapping) and "settings" in data:
        data = data["settings"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{where}: expected a non-empty JSON list of settings")
    settings = [Setting.from_dict(d, f"{where}: setting {i + 1}") for i, d in enumerate(data)]
    seen: set[str] = set()
    for i, s in enumerate(settings):
        if s.key in seen:
            raise UserError(f"{where}: setting {i + 1} ({s.describe()}) is listed twice")
        seen.add(s.key)
    return settings


def load_settings(path: Path) -> list[Setting]:
    return parse_settings(_read_json(path, "settings file"), str(path))


def _read_json(path: Path, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{what} {path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- specs


def study_config(setting: Setting) -> StudyConfig:
    """The study configuration whose trials this setting's runs are."""
    return StudyConfig(system=setting.system, figure=setting.figure, rate_req_s=setting.rate_req_s,
                       num_prompts=setting.num_prompts, model=setting.model, seed=setting.seed,
                       trial_seconds=setting.trial_seconds)


def study_context(setting: Setting) -> StudyContext:
    """What ``autotune.study.prepare`` resolves, without storage or backend:
    enough for the study's own ``trial_spec`` and ``_reference_spec``."""
    config = study_config(setting)
    system = get_system(setting.system)
    figure = get_figure(setting.figure)
    _check_figure_options(config, figure)
    workload = study_workload(config, figure, system, setting.rate_req_s)
    return StudyContext(config=config, system=system, figure=figure, space=system.search_space(),
                        model=from_name(setting.model), rate_req_s=setting.rate_req_s, rate_basis="fidelity setting",
                        workload=workload, study=None, backend=None)  # type: ignore[arg-type]


def spec_for(setting: Setting, kind: TrialKind, run: int, context: StudyContext | None = None) -> TrialSpec:
    """The trial a study would run: COLOCATED with the setting's knobs,
    SERVING_ALONE / TRAINER_ALONE as the study's references. Every run replays
    the same workload; its seed, number and label differ so that the backend
    draws fresh prompt tokens and logs each run apart. ``context``: a
    ``study_context(setting)`` made before, to build the workload once."""
    ctx = context if context is not None else study_context(setting)
    if kind is TrialKind.COLOCATED:
        spec = trial_spec(ctx, setting.params, run)
        return replace(spec, label=setting.label(run))
    spec = _reference_spec(ctx, kind)
    name = kind.value.replace("_", "-")
    label = f"{setting.system}-{setting.figure}-{setting.rate_req_s:g}rps-{name}-run{run}"
    return replace(spec, seed=ctx.config.seed + run, number=run, label=label)


def server_key(setting: Setting) -> tuple[str, float, bool]:
    """What decides the vLLM server a system's trials need: model, memory share, MPS."""
    system = get_system(setting.system)
    policy = system.policy(system.default_params())
    return setting.model, policy.gpu_memory_utilization, policy.mps


def describe_server(key: tuple[str, float, bool]) -> str:
    model, gmu, mps = key
    return f"{model}, gpu_memory_utilization {gmu:g}, MPS {'on' if mps else 'off'}"


def reference_key(setting: Setting, context: StudyContext | None = None) -> str:
    """Settings with equal keys share one serving-alone reference: same server, same workload."""
    ctx = context if context is not None else study_context(setting)
    model, gmu, mps = server_key(setting)
    return (f"{model}|gpu_memory_utilization={gmu:g}|mps={'on' if mps else 'off'}|{setting.figure}|"
            f"{setting.rate_req_s:g}rps|{workload_digest(ctx.workload)}")


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Step:
    """One trial of the plan: a reference (serving alone, trainer alone) or one run of a setting."""

    kind: TrialKind
    setting: Setting  # for a reference: the first setting it serves
    run: int
    reference_key: str
    systems: tuple[str, ...] = ()  # for a reference: every system it serves

    @property
    def label(self) -> str:
        if self.kind is TrialKind.COLOCATED:
            return self.setting.label(self.run)
        if self.kind is TrialKind.TRAINER_ALONE:
            return f"{self.setting.system}-trainer-alone"
        return f"{self.setting.system}-{self.setting.figure}-{self.setting.rate_req_s:g}rps-serving-alone"


def trainer_alone_key(setting: Setting) -> str:
    """One trainer-alone reference per model and system (its policy, see ``_reference_spec``)."""
    return f"trainer_alone|{setting.model}|{setting.system}"


def plan(settings: Sequence[Setting], runs: int, trainer_alone: bool = False,
         contexts: Mapping[str, StudyContext] | None = None) -> list[Step]:
    """Trials in a server-friendly order: settings that need the same server
    together (groups in order of first appearance), and within a group, per
    shared workload, its serving-alone reference first, then run 0 of every
    setting, then run 1, ... (so a call cut short by a time limit has a first
    run of more settings). ``trainer_alone``: each system's trainer-alone
    reference (the PEFT ceiling) at the end of its server's group."""
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    contexts = contexts or {s.key: study_context(s) for s in settings}
    servers: dict[tuple[str, float, bool], dict[str, list[Setting]]] = {}
    for s in settings:
        servers.setdefault(server_key(s), {}).setdefault(reference_key(s, contexts[s.key]), []).append(s)
    steps: list[Step] = []
    for by_reference in servers.values():
        for ref_key, group in by_reference.items():
            systems = tuple(dict.fromkeys(s.system for s in group))
            steps.append(Step(TrialKind.SERVING_ALONE, group[0], 0, ref_key, systems))
            for run in range(runs):
                steps.extend(Step(TrialKind.COLOCATED, s, run, ref_key) for s in group)
        if trainer_alone:
            firsts: dict[str, Setting] = {}
            for group in by_reference.values():
                for s in group:
                    firsts.setdefault(trainer_alone_key(s), s)
            for key, s in firsts.items():
                steps.append(Step(TrialKind.TRAINER_ALONE, s, 0, key, (s.system,)))
    return steps


# ---------------------------------------------------------------- the rows file


def run_record(run: int, result: TrialResult) -> dict[str, Any]:
    """One run as the rows file keeps it; a crash keeps its reason and null figures."""
    return {"run": run, **_measured(result, RUN_METRICS)}


def _measured(result: TrialResult, names: Sequence[str]) -> dict[str, Any]:
    """The figures ``names``, the request counts, the error and the wall time of a run."""
    metrics = result.metrics()
    rec: dict[str, Any] = {name: metrics.get(name) for name in names}
    rec["completed"] = int(metrics["completed"]) if "completed" in metrics else None
    rec["failed"] = int(metrics["failed"]) if "failed" in metrics else None
    rec["error"] = result.error
    rec["wall_s"] = result.wall_s
    return rec


def reference_record(step: Step, result: TrialResult, digest: str | None) -> dict[str, Any]:
    """A reference run (serving alone, or trainer alone with ``--references``) as the rows file keeps it."""
    s = step.setting
    model, gmu, mps = server_key(s)
    rec: dict[str, Any] = {
        "kind": step.kind.value, "key": step.reference_key, "systems": list(step.systems), "system": s.system,
        "figure": s.figure, "rate_req_s": s.rate_req_s, "num_prompts": s.num_prompts,
        "trial_seconds": s.trial_seconds, "model": model, "seed": s.seed, "workload_digest": digest,
        "server": {"gpu_memory_utilization": gmu, "mps": mps},
    }
    names = REFERENCE_METRICS if step.kind is TrialKind.SERVING_ALONE else ("peft_samples_per_s",)
    return {**rec, **_measured(result, names)}


@dataclass
class RowsFile:
    """What the GPU script measured; see the module docstring for the format."""

    hardware: str
    machine: str
    command: str
    started: str
    settings: list[dict[str, Any]] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, settings: Sequence[Setting], hardware: str, machine: str, command: str) -> RowsFile:
        out = cls(hardware, machine, command, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  [s.to_dict() for s in settings])
        for s in settings:
            out.row(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "machine": self.machine, "command": self.command,
                "started": self.started, "settings": self.settings, "references": self.references,
                "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Any, where: str = "rows file") -> RowsFile:
        if not isinstance(d, Mapping):
            raise UserError(f"{where}: expected a JSON object")
        missing = [k for k in ("hardware", "settings", "references", "rows") if k not in d]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
        for k in ("settings", "references", "rows"):
            if not isinstance(d[k], list):
                raise UserError(f"{where}: {k} must be a list")
        for i, row in enumerate(d["rows"]):
            if not isinstance(row, Mapping) or not isinstance(row.get("runs"), list):
                raise UserError(f"{where}: row {i + 1} has no list of runs")
        return cls(str(d["hardware"]), str(d.get("machine", "")), str(d.get("command", "")),
                   str(d.get("started", "")), list(d["settings"]), list(d["references"]), list(d["rows"]))

    @classmethod
    def load(cls, path: Path) -> RowsFile:
        return cls.from_dict(_read_json(path, "rows file"), str(path))

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    # -------------------------------------------------------------- access

    def row(self, setting: Setting) -> dict[str, Any]:
        """The setting's row, added (with no runs) if it has none."""
        for row in self.rows:
            if row_setting(row).key == setting.key:
                return row
        d = setting.to_dict()
        row = {k: d[k] for k in ("system", "figure", "rate_req_s", "params", "num_prompts", "trial_seconds")}
        if setting.model != DEFAULT_MODEL or setting.seed != 0:
            row.update(model=setting.model, seed=setting.seed)
        row["runs"] = []
        self.rows.append(row)
        return row

    def add_run(self, setting: Setting, record: dict[str, Any]) -> None:
        self.row(setting)["runs"].append(record)

    def has_run(self, setting: Setting, run: int) -> bool:
        return any(r.get("run") == run for r in self.row(setting)["runs"])

    def reference(self, key: str) -> dict[str, Any] | None:
        """The latest reference under ``key`` that measured something (a failed one is made again)."""
        ok = [r for r in self.references if r.get("key") == key and not r.get("error")]
        return ok[-1] if ok else None

    def settings_list(self) -> list[Setting]:
        return [Setting.from_dict(d, f"rows file: setting {i + 1}") for i, d in enumerate(self.settings)]


def row_setting(row: Mapping[str, Any], held_out: bool = True) -> Setting:
    """The setting a row was measured for."""
    fields = {k: row[k] for k in ("system", "figure", "rate_req_s", "params", "num_prompts", "trial_seconds")
              if k in row}
    for k in ("model", "seed"):
        if k in row:
            fields[k] = row[k]
    return Setting.from_dict({**fields, "held_out": held_out}, "row")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write whole or not at all: a temporary file beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- numbers


def median_and_spread(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the values given; None, None, None when there are none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None, None
    return statistics.median(v), min(v), max(v)
