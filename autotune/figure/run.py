"""Run a figure's studies, one per (system, request rate) (fig13: per served
LoRA setting too; fig12: one, a sweep of LLMStation's pause points), and
write what it shows.

On the simulator the studies run side by side, one process each
(``concurrent.futures.ProcessPoolExecutor``, ``workers`` at a time), each
study in its own SQLite file under ``OUT/studies/`` so that every file has one
writer. On the GPU (or with one worker) they run one after another in this
process, through one backend. Either way a study already stored is resumed
and gets only the trials it lacks, and every study writes its lines to
``OUT/logs/STUDY.log``, never to the terminal.

The parent shows the progress by polling the study files (read-only) about
every 0.5 s: a live table on a terminal, one line per finished study
otherwise. Ctrl-C (or SIGTERM) stops it: a worker marks its trial in flight
interrupted (as the tune command does) and ends; nothing is left running.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autotune.backends import Backend, make_backend
from autotune.errors import EnvironmentFailure, UserError, os_error
from autotune.figure.rows import (FIG12_TASKLETS, ONE_RATE, FigureData, FigureRow, check_figure, default_rates,
                                  figure_csv_text, figure_data, figure_text, finished_line, lora_label, lora_variants,
                                  study_row, tasklet_settings, write_text)
from autotune.figure.plot import INSTALL_HINT, draw, have_matplotlib
from autotune.figures import LORA_DISTS, LORA_RANKS
from autotune.live import PlainReporter
from autotune.results import StudyResult, load_result, write_json
from autotune.samplers import DEFAULT_SAMPLER
from autotune.slo import SloSpec
from autotune.storage import open_storage
from autotune.study import StudyConfig, default_study_name, run_study
from autotune.systems import get_system

#: How often the parent reads the study files for the live view, s.
POLL_INTERVAL_S = 0.5
#: How often a worker looks for the stop request during a trial, s.
STOP_CHECK_S = 0.1
#: How long the parent waits for workers to record their trial in flight after a stop, s.
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class FigureRequest:
    """What ``autotune figure`` was asked for."""

    figure: str
    systems: tuple[str, ...]
    rates_req_s: tuple[float, ...] | None  # None: the preset rate r and r/4, r/2, 3r/4
    trials: int
    out_dir: Path
    backend: str = "sim"
    hardware: str | None = None  # sim: packaged profile (None: the default)
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    num_prompts: int | None = None
    slo: SloSpec = field(default_factory=SloSpec)
    storage: str | None = None  # one Optuna storage for every study; None: a SQLite file per study
    workers: int = 1
    objective: str | None = None  # None: the figure's (pareto for fig10's trade-off curves, else peft)
    lora_dists: tuple[str, ...] = LORA_DISTS  # fig13's groups
    lora_ranks: tuple[int, ...] = LORA_RANKS
    tasklets: tuple[int, ...] = FIG12_TASKLETS  # fig12: tasklets between pause points, one trial each

    @property
    def study_objective(self) -> str:
        if self.objective is not None:
            return self.objective
        return "pareto" if check_figure(self.figure).pareto else "peft"


@dataclass(frozen=True)
class FigureJob:
    """One study of the figure: picklable, for a worker process."""

    system: str
    rate_req_s: float
    trials: int  # the study's target; only the missing ones are run
    config: StudyConfig
    backend: str
    backend_options: dict[str, Any]
    log_path: Path
    stop_path: Path  # exists: stop (the parent was interrupted)
    lora: str = ""  # fig13: the served adapters ("uniform r8"); "" elsewhere

    @property
    def study_name(self) -> str:
        assert self.config.study_name is not None
        return self.config.study_name

    @property
    def storage(self) -> str:
        assert self.config.storage is not None
        return self.config.storage

    @property
    def key(self) -> tuple[str, float, str]:
        return self.system, self.rate_req_s, self.lora


# ---------------------------------------------------------------- planning


def check_out_dir(path: Path) -> None:
    """``--out`` is a folder, or can be made one, and can be written (bad
    input: exit 2; not writable: exit 1)."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == Path(path) else f": {existing}"
        raise UserError(f"--out {path}{where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"--out {path}: folder {existing} is not writable")


def backend_options(request: FigureRequest) -> dict[str, Any]:
    if request.backend == "sim":
        return {"profile": request.hardware}
    if request.hardware is not None:
        raise UserError(f"--hardware applies to --backend sim, not {request.backend}")
    return {"runs_dir": request.out_dir}


def resolve_rates(request: FigureRequest, hardware: str) -> tuple[tuple[float, ...], str]:
    """The rates, and a line saying where they come from."""
    figure = check_figure(request.figure)
    if not figure.serves:
        if request.rates_req_s is not None:
            raise UserError(f"--rates: {request.figure} serves nothing")
        return (0.0,), "no serving"
    if request.rates_req_s is not None:
        if request.figure in ONE_RATE and len(request.rates_req_s) > 1:
            raise UserError(f"--rates: {request.figure} is drawn at one request rate, got "
                            f"{', '.join(f'{r:g}' for r in request.rates_req_s)}")
        return request.rates_req_s, "--rates"
    preset, hw = figure.default_rate(hardware)
    if request.figure in ONE_RATE:
        return (preset,), f"{request.figure}'s preset for {hw}"
    return default_rates(preset), f"r/4, r/2, 3r/4 and r = {preset:g} req/s, {request.figure}'s preset for {hw}"


def check_request(request: FigureRequest) -> None:
    """What the figure's studies would refuse one by one, refused once before any runs."""
    figure = check_figure(request.figure)
    if not figure_systems(request):
        raise UserError(f"{request.figure} is for {', '.join(figure.systems or ())} only; "
                        f"--systems names {', '.join(request.systems)}")
    if request.study_objective == "pareto" and not figure.serves:
        raise UserError(f"--objective pareto trades PEFT throughput against serving latency; "
                        f"{request.figure} serves nothing")


def figure_systems(request: FigureRequest) -> tuple[str, ...]:
    """The systems asked for, less those the figure leaves out (fig12: LLMStation only)."""
    allowed = check_figure(request.figure).systems
    return tuple(s for s in request.systems if allowed is None or s in allowed)


def plan_jobs(request: FigureRequest, hardware: str) -> list[FigureJob]:
    """One job per (system, rate), in the order the figure lists them."""
    rates, _ = resolve_rates(request, hardware)
    out = request.out_dir
    figure = check_figure(request.figure)
    variants = lora_variants(request.lora_dists, request.lora_ranks) if figure.lora_adapters else [(None, 8)]
    settings = tasklet_settings(request.tasklets) if request.figure == "fig12" else ()
    jobs = []
    for system in figure_systems(request):
        for rate in rates:
            for dist, rank in variants:
                config = StudyConfig(system=system, figure=request.figure, backend=request.backend,
                                     rate_req_s=rate if figure.serves else None, num_prompts=request.num_prompts,
                                     slo=request.slo, sampler=request.sampler, seed=request.seed, runs_dir=out,
                                     lora_dist=dist, lora_rank=rank, objective=request.study_objective,
                                     settings=settings)
                name = default_study_name(config, rate, request.backend)
                storage = request.storage or f"sqlite:///{out / 'studies' / f'{name}.db'}"
                config = replace(config, study_name=name, storage=storage)
                jobs.append(FigureJob(system, rate, len(settings) or request.trials, config, request.backend,
                                      backend_options(request), out / "logs" / f"{name}.log",
                                      out / "logs" / f".stop-{os.getpid()}", lora=lora_label(dist, rank)))
    return jobs


def _cost(job: FigureJob) -> float:
    """Requests per trial, roughly what a study costs: the longest start first."""
    return job.config.num_prompts or job.rate_req_s * get_system(job.system).prompts_per_rate


# ---------------------------------------------------------------- one study


def finished_trials(storage: str, study_name: str) -> int:
    """Trials of the study that finished (COMPLETE: crashed ones included,
    interrupted ones not); 0 where there is no study yet."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return 0
    backing = open_storage(storage)
    if study_name not in optuna.get_all_study_names(backing):
        return 0
    study = optuna.load_study(study_name=study_name, storage=backing, sampler=optuna.samplers.RandomSampler(seed=0))
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_one(job: FigureJob, backend: Backend, log: TextIO, reporter: PlainReporter | None = None) -> None:
    """The study of ``job``, topped up to ``job.trials`` finished trials."""
    done = finished_trials(job.storage, job.study_name)
    missing = max(0, job.trials - done)
    print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.study_name}: {done} trials stored, "
          f"{missing} to run for {job.trials}", file=log, flush=True)
    run_study(job.config, backend, missing, reporter or PlainReporter(log))


class _StoppableReporter(PlainReporter):
    """A study's lines, and its way to stop: once ``should_stop()`` (the
    parent made the stop file, or Ctrl-C was pressed) the next progress
    report raises KeyboardInterrupt inside the trial, which the study records
    as interrupted; never between Optuna's steps, where a trial would be left
    RUNNING."""

    def __init__(self, stream: TextIO, should_stop: Callable[[], bool]) -> None:
        super().__init__(stream)
        self.should_stop = should_stop
        self._checked_s = -float("inf")

    def on_progress(self, fraction: float, status: str) -> None:
        now = time.monotonic()
        if now - self._checked_s >= STOP_CHECK_S:
            self._checked_s = now
            if self.should_stop():
                raise KeyboardInterrupt


def _init_worker() -> None:
    """A worker leaves Ctrl-C to the parent (which asks it to stop) and
    writes nothing to the terminal: between studies its output goes nowhere,
    during one to the study's log."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def run_job(job: FigureJob) -> str:
    """In a worker process: the study of ``job``. ``done``, or ``stopped``
    where the parent asked it to stop first."""
    if job.stop_path.exists():
        return "stopped"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    with open(job.log_path, "a", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            with make_backend(job.backend, **job.backend_options) as backend:
                run_one(job, backend, log, _StoppableReporter(log, job.stop_path.exists))
        except KeyboardInterrupt:
            print("stopped: the trial in flight is recorded as interrupted", file=log)
            return "stopped"
        except Exception:
            traceback.print_exc(file=log)
            raise
        finally:
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
    return "done"


# ---------------------------------------------------------------- watching


def _read_only(url: str) -> tuple[optuna.storages.BaseStorage, Path | None]:
    """A storage that only reads (SQLite: opened read-only, no tables made),
    and the SQLite file it reads."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).resolve()
        ro = f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true"
        return optuna.storages.RDBStorage(ro, skip_compatibility_check=True, skip_table_creation=True), path
    return open_storage(url), None


class StudyPoller:
    """The jobs' studies as they are now, read at most every ``interval_s``;
    a SQLite file is read again only when it changed."""

    def __init__(self, jobs: Sequence[FigureJob], interval_s: float = POLL_INTERVAL_S) -> None:
        self.jobs = list(jobs)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._storages: dict[str, tuple[optuna.storages.BaseStorage, Path | None]] = {}
        self._stamps: dict[tuple[str, float, str], tuple[int, int]] = {}
        self._results: dict[tuple[str, float, str], StudyResult] = {}
        self._last_s = -float("inf")

    def invalidate(self, key: tuple[str, float, str]) -> None:
        with self._lock:
            self._stamps.pop(key, None)
            self._last_s = -float("inf")

    def poll(self) -> dict[tuple[str, float, str], StudyResult]:
        with self._lock:
            if time.monotonic() - self._last_s >= self.interval_s:
                for job in self.jobs:
                    self._read(job)
                self._last_s = time.monotonic()
            return dict(self._results)

    def _read(self, job: FigureJob) -> None:
        url = job.storage
        stamp = None
        if url.startswith("sqlite:///"):
            try:
                st = Path(url.removeprefix("sqlite:///")).stat()
            except OSError:
                return  # not made yet
            stamp = (st.st_mtime_ns, st.st_size)
            if self._stamps.get(job.key) == stamp:
                return
        try:
            if url not in self._storages:
                self._storages[url] = _read_only(url)
            storage, _ = self._storages[url]
            study = optuna.load_study(study_name=job.study_name, storage=storage,
                                      sampler=optuna.samplers.RandomSampler(seed=0))
            self._results[job.key] = StudyResult.of(study)
        except Exception:  # noqa: BLE001  (not made yet, or being written: read it next time)
            return
        if stamp is not None:
            self._stamps[job.key] = stamp


@dataclass(frozen=True)
class ProgressEntry:
    """One line of the live view."""

    system: str
    rate_req_s: float  # 0: nothing served (fig12)
    total_trials: int
    state: str  # waiting | running | done | stopped | failed
    row: FigureRow | None  # None: nothing stored yet
    lora: str = ""  # fig13: the served adapters


def progress_table(figure: str, entries: Sequence[ProgressEntry]) -> Table:
    """The live view: one row per (system, rate), from the rows alone."""
    done = sum(e.state == "done" for e in entries)
    table = Table(title=f"{figure}: {done} of {len(entries)} studies done", header_style="bold", title_justify="left")
    lora = any(e.lora for e in entries)
    pareto = any(e.row is not None and e.row.pareto_optimal is not None for e in entries)
    for name in ("system", "rate req/s", *(("LoRA adapters",) if lora else ()), "trials", "best PEFT samples/s",
                 "P99 TTFT ms", "P99 TPOT ms", "feasible", *(("Pareto-optimal",) if pareto else ()), "state"):
        table.add_column(name, justify="left" if name in ("system", "state", "LoRA adapters") else "right")
    styles = {"done": "green", "running": "cyan", "stopped": "yellow", "failed": "red", "waiting": "dim"}
    for e in entries:
        r = e.row
        trials = r.trials if r is not None else 0
        if r is None or not r.feasible:
            best = Text("-" if r is None or r.trials == 0 else "none", style="dim" if r is None else "yellow")
            ttft = tpot = Text("-", style="dim")
        else:
            best = Text(f"{r.peft_samples_per_s:.3f}", style="bold green")
            ttft, tpot = (Text(f"{v:.{d}f}") if v is not None else Text("-", style="dim")
                          for v, d in ((r.ttft_p99_ms, 1), (r.tpot_p99_ms, 2)))
        table.add_row(e.system, f"{e.rate_req_s:g}" if e.rate_req_s > 0 else "-", *((e.lora,) if lora else ()),
                      f"{trials}/{max(e.total_trials, trials)}", best, ttft, tpot,
                      str(r.feasible_trials) if r is not None else "-",
                      *((str(r.pareto_optimal) if r is not None and r.pareto_optimal is not None else "-",)
                        if pareto else ()),
                      Text(e.state, style=styles.get(e.state, "")))
    return table


class FigureView:
    """The live view's state: which studies finished (set by the parent's
    main thread), what the study files say (read by the poller)."""

    def __init__(self, figure: str, jobs: Sequence[FigureJob]) -> None:
        self.figure = figure
        self.jobs = list(jobs)
        self.poller = StudyPoller(jobs)
        self.states = {job.key: "waiting" for job in jobs}
        self._log_sizes = {job.key: _size(job.log_path) for job in jobs}

    def finish(self, job: FigureJob, state: str) -> None:
        self.states[job.key] = state
        self.poller.invalidate(job.key)

    def entries(self) -> list[ProgressEntry]:
        results = self.poller.poll()
        out = []
        for job in self.jobs:
            state = self.states[job.key]
            if state == "waiting" and _size(job.log_path) != self._log_sizes[job.key]:
                state = "running"  # its log grew: a worker has it
            result = results.get(job.key)
            out.append(ProgressEntry(job.system, job.rate_req_s, job.trials, state,
                                     study_row(result) if result is not None else None, job.lora))
        return out

    def render(self) -> Table:
        return progress_table(self.figure, self.entries())


def plan_text(request: FigureRequest, jobs: Sequence[FigureJob], rates: Sequence[float], basis: str) -> str:
    """What will run, in a few words."""
    systems = _count(len({j.system for j in jobs}), "system")
    if request.figure == "fig12":
        return (f"{systems}, no serving, one trial per setting of tasklets between pause points "
                f"({', '.join(map(str, request.tasklets))})")
    head = f"{systems} x {_count(len(rates), 'rate')} ({', '.join(f'{r:g}' for r in rates)} req/s: {basis})"
    groups = sorted({j.lora for j in jobs if j.lora})
    if groups:
        head += f" x {_count(len(groups), 'LoRA setting')} ({', '.join(groups)})"
    objective = " (objective pareto)" if request.study_objective == "pareto" else ""
    return f"{head}, {_count(request.trials, 'trial')} each{objective}"


def _never() -> bool:
    return False


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# ---------------------------------------------------------------- running


def _run_in_process(jobs: Sequence[FigureJob], backend: Backend, on_done: Callable[[FigureJob, str], None],
                    should_stop: Callable[[], bool]) -> None:
    """One study after another through ``backend``; each one's lines go to its log."""
    for job in jobs:
        if should_stop():
            raise KeyboardInterrupt
        with open(job.log_path, "a", encoding="utf-8", buffering=1) as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _optuna_logs_to(log):
            try:
                run_one(job, backend, log, _StoppableReporter(log, should_stop))
            except KeyboardInterrupt:
                print("stopped (Ctrl-C): the trial in flight is recorded as interrupted", file=log)
                on_done(job, "stopped")
                raise
            except Exception:
                traceback.print_exc(file=log)
                on_done(job, "failed")
                raise
        on_done(job, "done")


@contextlib.contextmanager
def _optuna_logs_to(stream: TextIO) -> Iterator[None]:
    """Optuna's own messages (a trial that failed, with its traceback) into
    the study's log, not onto the terminal."""
    handler = logging.StreamHandler(stream)
    optuna.logging.disable_default_handler()
    logging.getLogger("optuna").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.enable_default_handler()


def _run_pool(jobs: Sequence[FigureJob], workers: int, on_done: Callable[[FigureJob, str], None]) -> None:
    """The studies side by side, ``workers`` processes; the first error, or
    Ctrl-C, stops them all (each records its trial in flight) before it goes up."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    futures: dict[Future, FigureJob] = {}
    try:
        for job in sorted(jobs, key=_cost, reverse=True):
            futures[pool.submit(run_job, job)] = job
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_INTERVAL_S, return_when=FIRST_COMPLETED)
            for future in done:
                job = futures[future]
                try:
                    state = future.result()
                except BaseException:
                    on_done(job, "failed")
                    raise
                on_done(job, state)
    except BaseException:
        _stop_pool(pool, futures, on_done)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor, futures: dict[Future, FigureJob],
               on_done: Callable[[FigureJob, str], None]) -> None:
    """Ask every worker to stop (the stop file), let them record their trial
    in flight, and end them; any that does not end in ``STOP_GRACE_S`` is killed."""
    jobs = list(futures.values())
    if not jobs:
        pool.shutdown(wait=True)
        return
    with _ignoring_interrupts():  # a second Ctrl-C would leave the workers behind
        _ask_to_stop(pool, futures, on_done, jobs[0].stop_path)


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ask_to_stop(pool: ProcessPoolExecutor, futures: dict[Future, FigureJob],
                 on_done: Callable[[FigureJob, str], None], stop: Path) -> None:
    with contextlib.suppress(OSError):
        stop.touch()
    for future in futures:
        future.cancel()
    running = [f for f in futures if not f.done()]
    finished, late = wait(running, timeout=STOP_GRACE_S)
    for future in finished:
        if not future.cancelled() and future.exception() is None:
            on_done(futures[future], future.result())
    if late:  # a worker that did not answer: ended the hard way
        for child in multiprocessing.active_children():
            child.terminate()
            child.join(5.0)
            if child.is_alive():
                child.kill()
                child.join()
    pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _interrupts(deferred: threading.Event | None) -> Iterator[None]:
    """SIGTERM stops the run as Ctrl-C does. ``deferred`` (studies in this
    process): the first Ctrl-C or SIGTERM only sets it, and the study stops
    at its next progress report, inside the trial; a second one stops at once.
    Otherwise (workers: this process only watches) either raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        if deferred is None or deferred.is_set():
            raise KeyboardInterrupt
        deferred.set()

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _make_dirs(out: Path, storage: str | None) -> None:
    try:
        for sub in ("logs", "json") + (("studies",) if storage is None else ()):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"--out {out}: cannot create it") from None


def run_figure(request: FigureRequest, console: Console, plain: bool) -> FigureData:
    """Run (or resume) every study of the figure, then write ``FIG.csv``, the
    studies' JSON, and ``FIG.png``/``FIG.svg`` where matplotlib is installed;
    print the comparison table."""
    check_request(request)
    check_out_dir(request.out_dir)
    options = backend_options(request)
    if request.storage is not None:  # a bad URL now, not from a worker
        open_storage(request.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = request.out_dir
    live = not plain and console.is_terminal

    with contextlib.ExitStack() as stack:
        backend = None
        if request.backend == "sim":
            hardware = make_backend("sim", **options).hardware  # the profile's name; cheap
        else:
            backend = stack.enter_context(make_backend(request.backend, **options))
            hardware = backend.hardware
        rates, basis = resolve_rates(request, hardware)
        jobs = plan_jobs(request, hardware)
        _make_dirs(out, request.storage)
        in_process = request.backend != "sim" or request.workers == 1 or len(jobs) == 1
        workers = 1 if in_process else min(request.workers, len(jobs))
        if not in_process and request.storage is not None and request.storage.startswith("sqlite:"):
            workers, in_process = 1, True
            console.print("one SQLite --storage for every study: running them one after another "
                          "(several writers to one SQLite file are fragile)",
                          markup=False, highlight=False, soft_wrap=True)
        console.print(f"{request.figure}: {plan_text(request, jobs, rates, basis)}, {request.backend} on {hardware}, "
                      f"{_count(workers, 'worker')}; logs in {out / 'logs'}", markup=False, highlight=False,
                      soft_wrap=True)

        view = FigureView(request.figure, jobs)

        def on_done(job: FigureJob, state: str) -> None:
            view.finish(job, state)
            if not live and state == "done":
                row = study_row(load_result(job.storage, job.study_name))
                console.print(finished_line(row), markup=False, highlight=False, soft_wrap=True)

        stop = jobs[0].stop_path
        stop.unlink(missing_ok=True)
        stack.callback(stop.unlink, missing_ok=True)
        try:
            # Studies in this process on the simulator stop at a trial's next
            # progress report; the GPU backend cleans up after a Ctrl-C anywhere
            # (as with the tune command), so there it stops at once.
            stopping = threading.Event() if in_process and request.backend == "sim" else None
            with contextlib.ExitStack() as showing:
                showing.enter_context(_interrupts(stopping))
                if live:
                    showing.enter_context(Live(console=console, get_renderable=view.render,
                                               refresh_per_second=1 / POLL_INTERVAL_S, transient=False))
                if in_process:
                    if backend is None:
                        backend = stack.enter_context(make_backend(request.backend, **options))
                    _run_in_process(jobs, backend, on_done, stopping.is_set if stopping is not None else _never)
                else:
                    _run_pool(jobs, workers, on_done)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("the studies keep every finished trial; the same command resumes them") from None

    results = [load_result(job.storage, job.study_name) for job in jobs]
    data = figure_data(request.figure, results, figure_systems(request))
    write_outputs(data, results, out, console)
    return data


def write_outputs(data: FigureData, results: Sequence[StudyResult], out: Path, console: Console) -> None:
    """FIG.csv, json/STUDY.json, FIG.png and FIG.svg; the comparison table and where they went."""
    csv_path = out / f"{data.figure}.csv"
    write_text(csv_path, figure_csv_text(data))
    for result in results:
        write_json(result, out / "json" / f"{result.study_name}.json")
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(figure_text(data))
    say(f"written: {csv_path}, {len(results)} study results under {out / 'json'}")
    if have_matplotlib():
        png, svg = out / f"{data.figure}.png", out / f"{data.figure}.svg"
        draw(data, png, svg)
        say(f"figure: {png} and {svg}")
    else:
        say(f"no figure drawn: {data.figure}.png and .svg need matplotlib: {INSTALL_HINT}")
