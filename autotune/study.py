"""An Optuna study per (system, figure, rate, backend): maximize PEFT
samples/s subject to P99 TTFT and P99 TPOT limits (``objective="peft"``), or
maximize PEFT samples/s and minimize P99 TTFT and P99 TPOT at once
(``objective="pareto"``: a multi-objective study whose Pareto-optimal
feasible trials are Optuna's ``study.best_trials``).

Every finished trial carries both constraints (``trial.set_constraint``,
<= 0 met); a crashed trial is COMPLETE with 0 samples/s and large positive
violations, so model-based samplers learn from it and it is never feasible.
Everything needed to rebuild a table or plot is stored on the study: its
configuration, the resolved SLOs, the reference runs, and each trial's
metrics.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autotune.backends import Backend
from autotune.confirm import confirm
from autotune.context import StudyConfig, StudyContext, StudyObserver, study_workload
from autotune.errors import EnvironmentFailure, UserError, os_error
from autotune.figures import FigurePreset, get_figure
from autotune.knobs import SearchSpace
from autotune.models import ModelConfig, resolve_model
from autotune.records import RANGE_IDENTITY, migrate_identity, outcome_of, reference_metrics
from autotune.distinct import DistinctSampler, sampler_seed
from autotune.interrupts import InterruptGate
from autotune.samplers import make_sampler
from autotune.slo import CRASH_VIOLATION, ResolvedSlo, constraint_margins, resolve
from autotune.storage import (OWNER_ATTR, StudyTurn, abandon, create_study, fail_abandoned, folder_lock,
                              heartbeats_on, hide_password, is_storage_failure, open_storage, owner_alive,
                              owner_tag, storage_reason)
from autotune.systems import get_system
from autotune.trial import Outcome, TrialKind, TrialResult, TrialSpec
from autotune.workloads.spec import Workload

#: Seeds NumPy takes (the samplers' random state): 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: How often a worker with nothing to run looks again at others' trials in flight, s.
WAIT_POLL_S = 1.0
#: What a study optimizes: PEFT samples/s alone, or the three objectives below.
OBJECTIVES = ("peft", "pareto")
#: ``objective="pareto"``: the objective values' metrics and their directions, in order.
PARETO_OBJECTIVES = (("peft_samples_per_s", "maximize"), ("ttft_p99_ms", "minimize"), ("tpot_p99_ms", "minimize"))


# ---------------------------------------------------------------- storage


def storage_url(config: StudyConfig) -> str:
    if config.storage is not None:
        return config.storage
    return f"sqlite:///{config.runs_dir / 'studies.db'}"


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _failure_of(e: BaseException, url: str) -> UserError | None:
    """The one-line error for an exception that ended a study where the input
    or the machine is at fault (``e`` itself if it is one); None for a bug."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, OSError):
        what = "cannot write" if e.errno in _WRITE_ERRORS else "cannot use"
        return os_error(e, f"{what} {e.filename}" if e.filename is not None else f"{what} a file")
    if is_storage_failure(e):
        return EnvironmentFailure(f"the study's storage {hide_password(url)} failed: {storage_reason(e)}")
    if isinstance(e, AssertionError) and str(e) == "Should not reach." and e.__context__ is not None:
        return _failure_of(e.__context__, url)  # how Optuna ends a trial whose FAIL it could not store
    return None


def check_runs_dir(path: Path) -> None:
    """Before anything is stored: the runs folder is a folder, or can be made
    one, and can be written (bad input: exit 2; not writable: exit 1)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # the nearest folder that is there
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise UserError(f"--runs-dir {path}{where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"--runs-dir {path}: folder {existing} is not writable")


# ---------------------------------------------------------------- preparation


def default_study_name(config: StudyConfig, rate_req_s: float, backend: str) -> str:
    name = f"{config.system}-{config.figure}"
    if rate_req_s > 0:
        name += f"-{rate_req_s:g}rps"
    if config.lora_dist is not None:
        name += f"-lora-{config.lora_dist}-r{config.lora_rank}"
    if config.objective != "peft":
        name += f"-{config.objective}"
    return f"{name}-{backend}"


def _check_figure_options(config: StudyConfig, figure: FigurePreset) -> None:
    if figure.systems is not None and config.system not in figure.systems:
        raise UserError(f"{figure.name} is for {', '.join(figure.systems)} only, not {config.system}")
    if config.lora_dist is not None and not figure.lora_adapters:
        raise UserError(f"--lora-dist applies to fig13 only, not {figure.name}")
    if config.rate_req_s is not None and not (config.rate_req_s > 0 and math.isfinite(config.rate_req_s)):
        raise UserError(f"--rate must be a positive number of requests/s, got {config.rate_req_s:g}")
    if config.num_prompts is not None and config.num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {config.num_prompts}")
    if config.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {config.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if config.objective == "pareto" and not figure.serves:
        raise UserError(f"--objective pareto trades PEFT throughput against serving latency; "
                        f"{figure.name} serves nothing")
    if config.confirm_workloads < 0:
        raise UserError(f"--confirm must be >= 0, got {config.confirm_workloads}")
    if config.confirm_workloads and not figure.serves:
        raise UserError(f"--confirm re-runs settings against the SLO; {figure.name} serves nothing and has none")
    if config.trial_seconds is not None and not config.trial_seconds > 0:
        raise UserError(f"--trial-seconds must be positive, got {config.trial_seconds:g}")
    check_seed(config.seed)
    if config.tokenizer_path is not None and config.sharegpt_path is None:
        raise UserError("--tokenizer counts the tokens of --sharegpt prompts; give --sharegpt FILE too")


def check_seed(seed: int) -> None:
    """The seed NumPy's generators take (the samplers', the workloads')."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be in 0..{MAX_SEED} (2**32 - 1), got {seed}")


def workload_digest(workload: Workload | None) -> str:
    if workload is None:
        return "none"
    h = hashlib.sha256()
    for r in workload.requests:
        h.update(f"{r.arrival_s:.6f},{r.prompt_len},{r.output_len},{r.adapter};".encode())
    return h.hexdigest()[:16]


def _identity(ctx_config: StudyConfig, model: ModelConfig, rate: float, workload: Workload | None,
              space: SearchSpace, backend: Backend) -> dict[str, Any]:
    """What must match for a study to be resumed."""
    return {
        "system": ctx_config.system,
        "figure": ctx_config.figure,
        "backend": backend.name,
        **backend.identity(),
        "model": model.name,
        "rate_req_s": rate,
        "workload_digest": workload_digest(workload),
        "search_space": {k.name: {f: k.range_record()[f] for f in RANGE_IDENTITY} for k in space},
        "lora_rank": ctx_config.lora_rank if ctx_config.lora_dist is not None else None,
        "warmup_s": ctx_config.warmup_s,  # trainer steps left out of PEFT throughput
        # Only where it is not the default, so that studies made before there
        # was a choice resume as they were.
        **({"objective": ctx_config.objective} if ctx_config.objective != "peft" else {}),
    }


def prepare(config: StudyConfig, backend: Backend, *, worker_id: int = 0) -> StudyContext:
    """Resolve names, ranges, workload and storage; create or resume the study.
    ``worker_id``: which of several workers of the study this is (its sampler's seed)."""
    system = get_system(config.system)
    figure = get_figure(config.figure)
    _check_figure_options(config, figure)
    space = system.search_space(config.search_space_path)
    model = resolve_model(config.model or figure.model)
    if config.rate_req_s is not None:
        rate, basis = config.rate_req_s, "--rate"
    else:
        rate, hw = figure.default_rate(backend.hardware)
        basis = f"{hw} preset" if figure.serves else "no serving"
    workload = study_workload(config, figure, system, rate)
    identity = _identity(config, model, rate, workload, space, backend)

    check_runs_dir(config.runs_dir)  # the reference cache (and by default the database) go there
    try:
        config.runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"--runs-dir {config.runs_dir}: cannot create it") from None
    storage = open_storage(storage_url(config))
    name = config.study_name or default_study_name(config, rate, backend.name)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name in existing:
        stored = migrate_identity(existing[name].user_attrs.get("identity"))
        if stored is not None and stored != json.loads(json.dumps(identity)):
            diff = sorted(k for k in {**stored, **identity}
                          if json.dumps(identity.get(k)) != json.dumps(stored.get(k)))
            raise UserError(
                f"study {name!r} exists with other settings ({', '.join(diff)}); "
                "pass --study-name for a new study"
            )
    n_done = existing[name].n_trials if name in existing else 0
    seed = sampler_seed(config.seed, worker_id, n_done)
    sampler = make_sampler(config.sampler, space, seed=seed)
    if not isinstance(sampler, optuna.samplers.GridSampler):  # a grid never repeats a point itself
        sampler = DistinctSampler(sampler, space.distributions(), seed=seed)
    directions = [d for _, d in PARETO_OBJECTIVES] if config.objective == "pareto" else ["maximize"]
    study = create_study(storage, name, sampler, directions)
    fail_abandoned(storage, name)  # no dead worker's trial stays RUNNING past this start
    if "identity" not in study.user_attrs:
        study.set_user_attr("identity", identity)
        study.set_user_attr("config", _config_record(config, figure, model, rate, basis, workload, space, backend))
    return StudyContext(config, system, figure, space, model, rate, basis, workload, study, backend,
                        storage=storage)


def _config_record(config: StudyConfig, figure: FigurePreset, model: ModelConfig, rate: float, basis: str,
                   workload: Workload | None, space: SearchSpace, backend: Backend) -> dict[str, Any]:
    return {
        "system": config.system,
        "figure": figure.name,
        "rate_req_s": rate,
        "rate_basis": basis,
        "num_prompts": len(workload) if workload is not None else 0,
        "workload": workload.description if workload is not None else "no serving",
        "synthetic_workload": bool(workload is not None and workload.synthetic),
        "seed": config.seed,
        "objective": config.objective,
        "model": model.name,
        "lora_dist": config.lora_dist,
        "lora_rank": config.lora_rank if figure.lora_adapters else None,
        "search_space": {k.name: k.range_record() for k in space},
        "search_space_source": space.source,
        "backend": backend.describe(),
    }


# ---------------------------------------------------------------- references


def _reference_spec(ctx: StudyContext, kind: TrialKind) -> TrialSpec:
    """Serving alone: the trials' server (memory split, MPS) with no trainer.
    Trainer alone: full 512-token samples, no MPS cap, no pause: the PEFT ceiling."""
    policy = ctx.system.policy(ctx.space.defaults())
    if kind is TrialKind.TRAINER_ALONE:
        policy = policy.trainer_alone()
    return TrialSpec(
        kind=kind, system=ctx.system.name, params={}, policy=policy, model=ctx.model,
        workload=ctx.workload if kind is TrialKind.SERVING_ALONE else None,
        seed=ctx.config.seed, lora_serving=ctx.lora_serving, warmup_s=ctx.config.warmup_s,
    )


class ReferenceCache:
    """Reference runs shared by studies: per hardware, model, figure, rate and workload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Add one record. Studies running side by side (``autotune figure``)
        share the file: read, add and replace happen under a lock on its
        folder, each writer through a temporary file of its own."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.path.parent):
            data = self._load()
            data[key] = record
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
                tmp.replace(self.path)  # atomic: a crash never leaves half a file
            except OSError:
                tmp.unlink(missing_ok=True)
                raise


def _reference_key(ctx: StudyContext, kind: TrialKind) -> str:
    spec = _reference_spec(ctx, kind)
    parts = [kind.value, ctx.backend.cache_key(), ctx.model.name, json.dumps(spec.policy.to_dict(), sort_keys=True)]
    if kind is TrialKind.SERVING_ALONE:
        parts += [ctx.figure.name, f"{ctx.rate_req_s:g}", workload_digest(ctx.workload), str(ctx.lora_serving)]
    return "|".join(parts)


def run_references(ctx: StudyContext, observer: StudyObserver) -> None:
    """Serving alone (for relative SLOs) and trainer alone (the PEFT ceiling),
    made once and stored with the study (and, across studies, in the runs dir)."""
    stored = ctx.study.user_attrs.get("references", {})
    cache = ReferenceCache(ctx.config.runs_dir / "references.json")
    kinds = [TrialKind.TRAINER_ALONE]
    if ctx.workload is not None:
        kinds.insert(0, TrialKind.SERVING_ALONE)
    for kind in kinds:
        key = _reference_key(ctx, kind)
        record = stored.get(kind.value) or cache.get(key)
        if record is not None and record.get("error"):
            record = None  # a failed reference is made again, never reused
        cached = record is not None
        if record is None:
            observer.on_progress(0.0, f"reference run: {kind.value.replace('_', ' ')}")
            result = ctx.backend.run_trial(_reference_spec(ctx, kind), observer.on_progress)
            record = {"metrics": result.measured().to_dict(), "error": result.error}
            if result.error is None:
                try:
                    cache.put(key, record)
                except OSError as e:
                    raise os_error(e, f"cannot write {cache.path}") from None
        ctx.references[kind.value] = record
        observer.on_reference(ctx, kind.value, reference_metrics(record), cached)
    ctx.study.set_user_attr("references", ctx.references)

    if ctx.workload is None:
        ctx.slo = None
        return
    serving_alone = ctx.references[TrialKind.SERVING_ALONE.value]
    ref = TrialResult(serving=reference_metrics(serving_alone).serving, peft=None, error=serving_alone.get("error"))
    if "slo" in ctx.study.user_attrs and ctx.study.trials:
        ctx.slo = ResolvedSlo.from_dict(ctx.study.user_attrs["slo"])
        new = resolve(ctx.config.slo, ref, ctx.model)
        if new != ctx.slo:
            raise UserError(
                f"study {ctx.study.study_name!r} was run with other SLOs "
                f"(P99 TTFT {ctx.slo.ttft_p99_ms:.1f} ms, TPOT {ctx.slo.tpot_p99_ms:.2f} ms); "
                "pass the same SLO options or --study-name for a new study"
            )
    else:
        ctx.slo = resolve(ctx.config.slo, ref, ctx.model)
        ctx.study.set_user_attr("slo", ctx.slo.to_dict())


# ---------------------------------------------------------------- trials


def trial_spec(ctx: StudyContext, params: Mapping[str, float], number: int) -> TrialSpec:
    return TrialSpec(
        kind=TrialKind.COLOCATED if ctx.workload is not None else TrialKind.TRAINER_ALONE,
        system=ctx.system.name, params=dict(params), policy=ctx.system.policy(params),
        model=ctx.model, workload=ctx.workload, seed=ctx.config.seed + number,
        lora_serving=ctx.lora_serving, warmup_s=ctx.config.warmup_s, number=number,
    )


def record_trial(ctx: StudyContext, trial: optuna.Trial, result: TrialResult) -> float | tuple[float, ...]:
    """Set both constraints and the metrics on the trial; its objective value
    (``objective="pareto"``: its values, see ``objective_values``)."""
    margins = constraint_margins(result, ctx.slo)
    for key, value in margins.items():
        trial.set_constraint(key, value)
    trial.set_user_attr("metrics", result.measured().to_dict())
    outcome = outcome_of(result, margins)
    trial.set_user_attr("outcome", outcome.value)
    if result.error is not None:
        trial.set_user_attr("error", result.error)
    if result.notes:
        trial.set_user_attr("notes", list(result.notes))
    peft = 0.0 if result.crashed or result.peft is None else result.peft.peft_samples_per_s
    if ctx.config.objective == "pareto":
        return objective_values(peft, result.metrics(), ctx.slo)
    return peft


def objective_values(peft_samples_per_s: float, metrics: Mapping[str, float],
                     slo: ResolvedSlo | None) -> tuple[float, float, float]:
    """A pareto study's values (``PARETO_OBJECTIVES``): PEFT samples/s, P99
    TTFT ms, P99 TPOT ms. A latency the trial did not measure (it crashed) is
    its limit times ``1 + CRASH_VIOLATION``, the constraint's crash margin, so
    a crash is never on the front and the samplers still learn from it."""
    assert slo is not None, "a pareto study serves, so its SLO is resolved"
    limits = {"ttft_p99_ms": slo.ttft_p99_ms, "tpot_p99_ms": slo.tpot_p99_ms}
    latencies = [float(metrics[k]) if k in metrics and math.isfinite(metrics[k]) else limits[k] * (1 + CRASH_VIOLATION)
                 for k, _ in PARETO_OBJECTIVES[1:]]
    return (peft_samples_per_s, *latencies)


def enqueue_settings(ctx: StudyContext) -> int:
    """Queue each of ``config.settings`` that the study has not finished (or
    queued) yet; how many trials are now queued."""
    study = ctx.study
    done_or_queued = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
    have = [t.params or t.user_attrs.get("setting", {})  # a queued trial has no params yet
            for t in study.get_trials(deepcopy=False, states=done_or_queued)]
    for setting in ctx.config.settings:
        if not any(all(h.get(k) == v for k, v in setting.items()) for h in have):
            study.enqueue_trial(dict(setting), user_attrs={"setting": dict(setting)})
            have.append(dict(setting))
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def run_trials(ctx: StudyContext, n_trials: int, observer: StudyObserver, *,
               until_complete: int | None = None) -> None:
    """``n_trials`` more trials (fewer if a grid is exhausted); a worker of
    several (``until_complete``): trials until the study has that many
    COMPLETE ones, waiting while others' trials in flight may still fail
    (see ``_next_step``), and running the trials of dead workers again.

    Ctrl-C during a trial: the trial gets both constraints and its reason,
    Optuna records it FAIL, and the interrupt goes on up. Anything else that
    ends the study (a full or read-only disk, a storage that fails) does the
    same, and comes out as a one-line ``EnvironmentFailure`` (or
    ``UserError``); no trial is left RUNNING where the storage takes the FAIL.
    Ctrl-C and SIGTERM reach the study only inside a trial's measurement
    (``InterruptGate``): a trial is stored whole or failed, never half.
    """
    study = ctx.study
    url = storage_url(ctx.config)
    if ctx.workload is not None and ctx.slo is None:  # never a trial held to a missing limit
        raise RuntimeError("the study's SLO is resolved by run_references(); call it before run_trials()")
    # The study's workers (this machine's; on PostgreSQL every machine's)
    # queue, decide, ask and sample one at a time: none queues what another
    # did, starts a trial past the study's count, or samples a setting another
    # is sampling now.
    turn = StudyTurn(ctx.config.runs_dir, ctx.storage, study.study_name)
    with turn:
        if ctx.config.settings:
            enqueue_settings(ctx)
        elif not study.trials and not isinstance(study.sampler, optuna.samplers.GridSampler):
            study.enqueue_trial(ctx.space.defaults())  # the artifact's example values first
    in_flight: list[optuna.Trial] = []
    gate = InterruptGate()
    owner = owner_tag()

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        in_flight[:] = [trial]
        trial.set_user_attr(OWNER_ATTR, owner)
        try:
            params = {k.name: _suggest(trial, k) for k in ctx.space}
        finally:
            turn.release()
        observer.on_trial_start(ctx, trial.number, params)
        try:
            with gate.open():
                result = ctx.backend.run_trial(trial_spec(ctx, params, trial.number), observer.on_progress)
        except KeyboardInterrupt as e:
            signal_name = "SIGTERM" if getattr(e, "signum", None) == signal.SIGTERM else "Ctrl-C"
            abandon(trial, Outcome.INTERRUPTED, f"interrupted ({signal_name})")
            raise
        except Exception as e:
            failure = _failure_of(e, url)
            abandon(trial, Outcome.FAILED, str(failure) if failure is not None else _one_line(e))
            if failure is not None and failure is not e:
                raise failure from e
            raise
        return record_trial(ctx, trial, result)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        observer.on_trial_end(ctx, trial)

    n_run = 0
    try:
        with gate.installed():
            while True:
                turn.acquire()
                try:
                    step = _next_step(ctx, n_run, n_trials, until_complete)
                    if step == "run":
                        in_flight.clear()
                        study.optimize(objective, n_trials=1, callbacks=[callback], catch=(), gc_after_trial=False)
                        n_run += 1
                finally:
                    turn.release()
                if step == "stop":
                    break
                if step == "wait":
                    time.sleep(WAIT_POLL_S)
                gate.check()
    except KeyboardInterrupt:
        _quietly(record_backend, ctx)
        raise
    except Exception as e:
        failure = _failure_of(e, url)
        reason = str(failure) if failure is not None else _one_line(e)
        failed = not in_flight or _fail_if_running(study, in_flight[0], reason)
        _quietly(record_backend, ctx)
        if failure is None:
            raise
        if not failed:
            failure = type(failure)(f"{failure}; trial {in_flight[0].number} could not be marked failed "
                                    "and stays RUNNING")
        if failure is e:
            raise
        raise failure from e
    record_backend(ctx)


def _next_step(ctx: StudyContext, n_run: int, n_trials: int, until_complete: int | None) -> str:
    """What a study's loop does next: "run" a trial, "wait" (others' trials in
    flight may still fail and need running again), or "stop". Dead workers'
    trials are failed first, and queued to run again."""
    study = ctx.study
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
        return "stop"
    if until_complete is None:
        return "run" if n_run < n_trials else "stop"
    fail_abandoned(ctx.storage, study.study_name)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
    if TrialState.WAITING in states or complete + running < until_complete:
        return "run"
    if complete >= until_complete or running == 0:
        return "stop"
    # Only a trial whose worker can be watched (heartbeats, or this host) can
    # turn out dead; a journal's trial of another host is left to its worker.
    watched = heartbeats_on(ctx.storage) or any(
        owner_alive(t.user_attrs.get(OWNER_ATTR, "")) is not None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return "wait" if watched else "stop"


def _fail_if_running(study: optuna.Study, trial: optuna.Trial, reason: str) -> bool:
    """Record ``trial`` FAIL, with its constraints, if the failure left it
    RUNNING (Optuna's own FAIL did not reach the storage). Whether it is
    no longer RUNNING."""
    running = optuna.trial.TrialState.RUNNING
    try:
        if not any(t.number == trial.number for t in study.get_trials(deepcopy=False, states=(running,))):
            return True
        abandon(trial, Outcome.FAILED, reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return not any(t.number == trial.number for t in study.get_trials(deepcopy=False, states=(running,)))
    except Exception:  # noqa: BLE001  (the storage still fails)
        return False


def _quietly(fn, *args) -> None:
    """``fn(*args)`` while another error is on its way up: that one is reported."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def record_backend(ctx: StudyContext) -> None:
    """The backend's description once trials ran: what it knows only then (the
    GPU backend's server flags) joins what ``prepare`` stored."""
    config = dict(ctx.study.user_attrs.get("config", {}))
    config["backend"] = ctx.backend.describe()
    ctx.study.set_user_attr("config", config)


def _suggest(trial: optuna.Trial, knob) -> float:
    dist = knob.distribution()
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(knob.name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(knob.name, dist.low, dist.high, step=dist.step, log=dist.log)


def run_study(config: StudyConfig, backend: Backend, n_trials: int,
              observer: StudyObserver | None = None, *, worker_id: int = 0,
              until_complete: int | None = None) -> StudyContext:
    """Create or resume the study, make the reference runs, run ``n_trials``
    more trials, then confirm the best on ``config.confirm_workloads`` fresh
    workloads. A worker of several: ``worker_id`` and ``until_complete``
    (see ``run_trials``)."""
    observer = observer or StudyObserver()
    try:
        ctx = prepare(config, backend, worker_id=worker_id)
        observer.on_start(ctx, n_trials)
        run_references(ctx, observer)
        run_trials(ctx, n_trials, observer, until_complete=until_complete)
        confirm(ctx, config.confirm_workloads, observer)
        observer.on_end(ctx)
    except Exception as e:  # a disk or storage that fails: one line, not a traceback
        failure = _failure_of(e, storage_url(config))
        if failure is None or failure is e:
            raise
        raise failure from e
    return ctx
