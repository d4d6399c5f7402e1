"""Progress of a study: a rich live table on a terminal, one plain line per
trial elsewhere. The table is a pure function of ``TrialRow`` objects."""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping, Sequence
from typing import TextIO

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from autotune.context import StudyContext, StudyObserver
from autotune.metrics import TrialMetrics
from autotune.records import Confirmation, TrialRow
from autotune.results import _fmt, best_feasible, format_params

#: Rows shown at most; the best feasible trial is always among them.
MAX_ROWS = 25


def _latency_cell(value: float | None, limit: float | None, digits: int) -> Text:
    if value is None:
        return Text("-", style="dim")
    text = f"{value:.{digits}f}"
    if limit is None:
        return Text(text)
    return Text(text, style="green" if value <= limit else "red")


def pareto_numbers(ctx: StudyContext) -> frozenset[int] | None:
    """A pareto study's Pareto-optimal trials now (Optuna's ``best_trials``);
    None for a study of one objective."""
    if ctx.config.objective != "pareto":
        return None
    return frozenset(t.number for t in ctx.study.best_trials)


def header_text(ctx: StudyContext, rows: Sequence[TrialRow], pareto: Collection[int] | None = None) -> Text:
    cfg = ctx.config
    t = Text()
    t.append(f"{ctx.system.title}", style="bold")
    t.append(f" · {ctx.figure.name} · ")
    t.append(f"{ctx.rate_req_s:g} req/s ({ctx.rate_basis})" if ctx.workload is not None else "no serving")
    t.append(f" · {ctx.model.name} · {ctx.backend.name} backend · sampler {cfg.sampler}")
    if pareto is not None:
        t.append(" · objectives: max PEFT samples/s, min P99 TTFT, min P99 TPOT")
    t.append("\n")
    t.append(f"{ctx.backend.headline()}\n", style="dim")
    if ctx.workload is not None:
        t.append(f"workload: {ctx.workload.description}\n", style="dim")
    if ctx.slo is not None:
        t.append(f"SLO: P99 TTFT ≤ {ctx.slo.ttft_p99_ms:.1f} ms, P99 TPOT ≤ {ctx.slo.tpot_p99_ms:.2f} ms\n")
    best = best_feasible(rows)
    if best is not None:
        t.append("best feasible: ", style="bold")
        t.append(f"#{best.number} {best.peft_samples_per_s:.3f} samples/s  {format_params(best.params)}",
                 style="bold green")
    else:
        t.append("best feasible: none yet", style="yellow")
    if pareto is not None:
        t.append(f"\nPareto-optimal feasible trials: {len(pareto)}", style="bold")
        if pareto:
            t.append(f" (#{', #'.join(str(n) for n in sorted(pareto))})")
    return t


def trial_table(rows: Sequence[TrialRow], knob_names: Sequence[str],
                ttft_limit_ms: float | None, tpot_limit_ms: float | None,
                max_rows: int | None = MAX_ROWS, pareto: Collection[int] | None = None) -> Table:
    """The trials table: knob values, P99 latencies coloured against the SLO,
    PEFT samples/s, feasibility and state. At most ``max_rows`` rows (None: all).
    ``pareto`` (a pareto study's Pareto-optimal trial numbers): a column
    marking them."""
    table = Table(expand=False, header_style="bold")
    table.add_column("#", justify="right")
    for name in knob_names:
        table.add_column(name, justify="right")
    table.add_column("P99 TTFT ms", justify="right")
    table.add_column("P99 TPOT ms", justify="right")
    table.add_column("PEFT samples/s", justify="right")
    table.add_column("feasible", justify="center")
    if pareto is not None:
        table.add_column("Pareto", justify="center")
    table.add_column("state")
    shown = list(rows) if max_rows is None else _rows_to_show(rows, max_rows)
    for r in shown:
        state = Text(r.outcome, style={"crashed": "red", "failed": "red", "interrupted": "yellow", "running": "cyan"}.get(r.outcome, ""))
        if r.error:
            state.append(f": {r.error}", style="dim")
        table.add_row(
            str(r.number),
            *(_fmt(r.params[n]) if n in r.params else "-" for n in knob_names),
            _latency_cell(r.metrics.ttft_p99_ms, ttft_limit_ms, 1),
            _latency_cell(r.metrics.tpot_p99_ms, tpot_limit_ms, 2),
            f"{r.peft_samples_per_s:.3f}" if r.metrics.peft is not None else "-",
            Text("yes", style="green") if r.feasible else Text("no", style="red") if r.outcome != "running" else Text(""),
            *((Text("yes", style="bold green") if r.number in pareto else Text(""),) if pareto is not None else ()),
            state,
        )
    return table


def _rows_to_show(rows: Sequence[TrialRow], max_rows: int) -> list[TrialRow]:
    if len(rows) <= max_rows:
        return list(rows)
    best = best_feasible(rows)
    recent = list(rows[-max_rows:])
    if best is not None and best not in recent:  # the best, then the max_rows - 1 most recent
        recent = [best] + recent[1:]
    return recent


def confirmation_text(confirmed: Sequence[tuple[int, Confirmation]]) -> Text:
    """One line per confirmation run: the trial, the fresh workload, the P99s and the verdict."""
    t = Text()
    for number, c in confirmed:
        t.append(f"confirm #{number} on workload seed {c.workload_seed}: ")
        if c.error is not None:
            t.append(c.measured_text() + "\n", style="red")
            continue
        t.append(c.measured_text() + " ")
        t.append(c.outcome + "\n", style="green" if c.feasible else "red")
    t.rstrip()
    return t


class LiveReporter(StudyObserver):
    """A rich live table, refreshed after every trial, with the trial in flight's progress."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.rows: list[TrialRow] = []
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), console=self.console)
        self.task = self.progress.add_task("starting", total=1.0)
        self.live: Live | None = None
        self.ctx: StudyContext | None = None
        self.confirmed: list[tuple[int, Confirmation]] = []  # (trial number, re-run) as they finish

    def _render(self) -> Group:
        assert self.ctx is not None
        slo = self.ctx.slo
        pareto = pareto_numbers(self.ctx)
        parts = [header_text(self.ctx, self.rows, pareto),
                 trial_table(self.rows, self.ctx.space.names, slo and slo.ttft_p99_ms, slo and slo.tpot_p99_ms,
                             pareto=pareto)]
        if self.confirmed:
            parts.append(confirmation_text(self.confirmed))
        return Group(*parts, self.progress)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def on_start(self, ctx: StudyContext, n_trials: int) -> None:
        self.ctx = ctx
        self.rows = [TrialRow.of(t) for t in ctx.study.get_trials(deepcopy=False)
                     if t.state != optuna.trial.TrialState.RUNNING]
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def on_reference(self, ctx: StudyContext, name: str, metrics: TrialMetrics, cached: bool) -> None:
        self._refresh()

    def on_trial_start(self, ctx: StudyContext, number: int, params: Mapping[str, float]) -> None:
        self.progress.update(self.task, completed=0.0, description=f"trial {number}: {format_params(dict(params))}")
        self._refresh()

    def on_progress(self, fraction: float, status: str) -> None:
        self.progress.update(self.task, completed=max(0.0, min(1.0, fraction)), description=status)

    def on_trial_end(self, ctx: StudyContext, trial: optuna.trial.FrozenTrial) -> None:
        self.rows.append(TrialRow.of(trial))
        self.progress.update(self.task, completed=1.0)
        self._refresh()

    def on_confirm_start(self, ctx: StudyContext, number: int, params: Mapping[str, float], index: int,
                         n: int) -> None:
        self.progress.update(self.task, completed=0.0,
                             description=f"confirming trial {number} on fresh workload {index} of {n}")
        self._refresh()

    def on_confirm_end(self, ctx: StudyContext, number: int, record: Confirmation) -> None:
        self.confirmed.append((number, record))
        self._refresh()

    def on_end(self, ctx: StudyContext) -> None:
        self.close()

    def close(self) -> None:
        if self.live is not None:
            self.progress.update(self.task, visible=False)
            self._refresh()
            self.live.stop()
            self.live = None


class PlainReporter(StudyObserver):
    """One line per trial, for logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._slo_printed = False

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def on_start(self, ctx: StudyContext, n_trials: int) -> None:
        rate = f"{ctx.rate_req_s:g} req/s ({ctx.rate_basis})" if ctx.workload is not None else "no serving"
        self._print(f"study {ctx.study.study_name}: {ctx.system.name} {ctx.figure.name} {rate}, "
                    f"{ctx.model.name}, {ctx.backend.name} backend, sampler {ctx.config.sampler}, "
                    f"{n_trials} trials ({len(ctx.study.trials)} already)")
        self._print(ctx.backend.headline())
        if ctx.workload is not None:
            self._print(f"workload: {ctx.workload.description}")

    def on_reference(self, ctx: StudyContext, name: str, metrics: TrialMetrics, cached: bool) -> None:
        parts = [f"reference {name.replace('_', ' ')}{' (cached)' if cached else ''}:"]
        if metrics.serving is not None:
            parts.append(f"P99 TTFT {metrics.ttft_p99_ms:.1f} ms, P99 TPOT {metrics.tpot_p99_ms:.2f} ms")
        if metrics.peft is not None:
            parts.append(f"PEFT {metrics.peft_samples_per_s:.3f} samples/s")
        self._print(" ".join(parts))

    def on_trial_start(self, ctx: StudyContext, number: int, params: Mapping[str, float]) -> None:
        if ctx.slo is not None and not self._slo_printed:
            self._print(f"SLO: P99 TTFT <= {ctx.slo.ttft_p99_ms:.1f} ms ({ctx.slo.ttft_basis}), "
                        f"P99 TPOT <= {ctx.slo.tpot_p99_ms:.2f} ms ({ctx.slo.tpot_basis})")
            self._slo_printed = True

    def on_confirm_end(self, ctx: StudyContext, number: int, record: Confirmation) -> None:
        self._print(str(confirmation_text([(number, record)])))

    def on_trial_end(self, ctx: StudyContext, trial: optuna.trial.FrozenTrial) -> None:
        r = TrialRow.of(trial)
        m = r.metrics
        lat = ""
        if m.serving is not None:
            lat = f" ttft_p99_ms={m.ttft_p99_ms:.1f} tpot_p99_ms={m.tpot_p99_ms:.2f}"
        err = f" error={r.error!r}" if r.error else ""
        self._print(f"trial {r.number}: {format_params(r.params)}{lat} "
                    f"peft_samples_per_s={r.peft_samples_per_s:.3f} {r.outcome}{err}")
