"""The numbers of a figure, computed from the studies alone: one row per
study (system, request rate, and for fig13 the served LoRA adapters), and for
fig10 and fig12 one point per measured trial; the CSV and the text read them,
and the plot draws them (compute first, draw second).

Everything here is a pure function of ``StudyResult`` objects (or of the
rows made from them), so tests build the rows from made-up studies.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from autotune.errors import UserError, os_error
from autotune.figures import FIGURES, LORA_DISTS, LORA_RANKS, FigurePreset
from autotune.models import resolve_model
from autotune.results import StudyResult, tradeoff_curve
from autotune.systems import SYSTEMS, get_system

#: The figures ``autotune figure`` draws.
IN_SCOPE = ("fig8a", "fig9a", "fig10", "fig12", "fig13")
#: Figures drawn at one request rate (the preset's): a trade-off curve, and bars per LoRA setting.
ONE_RATE = ("fig10", "fig13")
#: The system the others are compared with (its PEFT over theirs, per rate).
REFERENCE_SYSTEM = "llmstation"
#: Columns of FIG.csv, in order (fig8a, fig9a; fig13 adds LORA_COLUMNS after the system).
CSV_COLUMNS = ("system", "rate_req_s", "best_knobs", "peft_samples_per_s", "ttft_p99_ms", "tpot_p99_ms",
               "feasible_trials", "trials", "llmstation_ratio")
LORA_COLUMNS = ("lora_dist", "lora_rank")
#: fig10.csv: one row per measured trial of every study.
TRADEOFF_COLUMNS = ("system", "rate_req_s", "trial", "knobs", "peft_samples_per_s", "ttft_p99_ms", "tpot_p99_ms",
                    "outcome", "pareto_optimal", "on_ttft_curve", "on_tpot_curve")
#: fig12.csv: one row per measured trial (one per setting of the sweep).
PAUSE_COLUMNS = ("system", "trial", "forward_tasklets", "backward_tasklets", "forward_pause_points",
                 "backward_pause_points", "pause_points_per_step", "peft_samples_per_s",
                 "trainer_alone_samples_per_s")
#: fig12's sweep: tasklets between two pause points, the same in both passes
#: (1: a pause after every layer, LLMStation's finest; 33: one per pass).
FIG12_TASKLETS = (1, 2, 4, 8, 16, 33)


# ---------------------------------------------------------------- input


def check_figure(name: str) -> FigurePreset:
    """The preset of a figure ``autotune figure`` draws; a one-line error otherwise."""
    if name in IN_SCOPE:
        return FIGURES[name]
    raise UserError(f"unknown figure {name!r}; choose one of: {', '.join(IN_SCOPE)}")


def parse_systems(text: str) -> tuple[str, ...]:
    """``all`` (LLMStation first, then the others) or names separated by commas, in the order given."""
    if text.strip() == "all":
        return (REFERENCE_SYSTEM, *(s for s in SYSTEMS if s != REFERENCE_SYSTEM))
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError(f"--systems must be 'all' or names separated by commas, got {text!r}")
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise UserError(f"--systems: unknown system {unknown[0]!r}; choose from: all, {', '.join(SYSTEMS)}")
    return tuple(dict.fromkeys(names))


def parse_rates(text: str) -> tuple[float, ...]:
    """Request rates (req/s) separated by commas: positive, finite; sorted, each once."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates must be numbers (req/s) separated by commas, got {text!r}") from None
    if not rates:
        raise UserError(f"--rates must name at least one rate (req/s), got {text!r}")
    bad = [r for r in rates if not (r > 0 and math.isfinite(r))]
    if bad:
        raise UserError(f"--rates must be positive request rates (req/s), got {bad[0]:g}")
    return tuple(sorted(set(rates)))


def parse_choices(text: str, flag: str, choices: Sequence[str]) -> tuple[str, ...]:
    """Names separated by commas, each one of ``choices``, in the order given, each once."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in choices]
    if not names or bad:
        got = repr(bad[0]) if bad else repr(text)
        raise UserError(f"{flag} must be among {', '.join(choices)}, separated by commas; got {got}")
    return tuple(dict.fromkeys(names))


def parse_ints(text: str, flag: str, allowed: Sequence[int] | None = None, low: int = 1,
               high: int | None = None) -> tuple[int, ...]:
    """Whole numbers separated by commas (``allowed`` only, or ``low``..``high``); sorted, each once."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be whole numbers separated by commas, got {text!r}") from None
    bad = [v for v in values if (v not in allowed if allowed is not None else not low <= v <= (high or v))]
    if not values or bad:
        what = ", ".join(map(str, allowed)) if allowed is not None else f"{low}..{high}"
        raise UserError(f"{flag} must be among {what}; got {bad[0] if bad else repr(text)}")
    return tuple(sorted(set(values)))


def lora_variants(dists: Sequence[str] = LORA_DISTS, ranks: Sequence[int] = LORA_RANKS) -> list[tuple[str, int]]:
    """fig13's bar groups: each distribution at each rank; ``none`` serves the
    base model only, so it is one group (at rank 8, which it does not use)."""
    out = [(d, r) for d in dists if d != "none" for r in ranks]
    return out + [("none", LORA_RANKS[0])] * ("none" in dists)


def lora_label(dist: str | None, rank: int | None) -> str:
    """``uniform r8``; ``none`` (the base model only)."""
    if dist is None:
        return ""
    return "none" if dist == "none" else f"{dist} r{rank}"


def tasklet_settings(tasklets: Sequence[int], system: str = REFERENCE_SYSTEM) -> tuple[dict[str, float], ...]:
    """fig12's settings: ``forward_tasklets = backward_tasklets = N`` for each
    N, the waits at their defaults (nothing is served, so they never apply)."""
    defaults = get_system(system).search_space().defaults()
    return tuple({**defaults, "forward_tasklets": n, "backward_tasklets": n} for n in tasklets)


def round_significant(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (5.25 -> 5.2, 1.75 -> 1.8)."""
    return float(f"{x:.{digits}g}")


def default_rates(preset_rate_req_s: float) -> tuple[float, ...]:
    """The figure's preset rate r and a few below it: r/4, r/2, 3r/4, r, to 2 significant digits."""
    r = preset_rate_req_s
    return tuple(sorted({round_significant(r * k / 4) for k in (1, 2, 3, 4)}))


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class FigureRow:
    """One point of the figure: a system's best setting under the SLO at one rate."""

    system: str
    rate_req_s: float
    best_knobs: dict[str, float] | None  # None: no setting met the SLO
    peft_samples_per_s: float  # of the best feasible trial; 0 where none met the SLO
    ttft_p99_ms: float | None  # of that trial
    tpot_p99_ms: float | None
    feasible_trials: int
    trials: int  # finished trials (interrupted ones are not counted)
    trainer_alone_samples_per_s: float | None  # the study's PEFT ceiling (its reference run)
    llmstation_ratio: float | None = None  # LLMStation's PEFT / this one's; inf, or None: blank
    lora_dist: str | None = None  # fig13: uniform | skewed | none
    lora_rank: int | None = None  # fig13: rank of the served adapters
    pareto_optimal: int | None = None  # a pareto study's Pareto-optimal feasible trials; None: one objective

    @property
    def feasible(self) -> bool:
        return self.best_knobs is not None

    @property
    def group(self) -> tuple[float, str]:
        """Where systems are compared: the rate, and fig13's LoRA setting."""
        return self.rate_req_s, lora_label(self.lora_dist, self.lora_rank)


@dataclass(frozen=True)
class TrialPoint:
    """One measured trial of a study, for the figures that draw trials
    (fig10's trade-off curves, fig12's sweep)."""

    system: str
    rate_req_s: float
    number: int
    params: dict[str, float]
    peft_samples_per_s: float
    ttft_p99_ms: float | None  # None: nothing served (fig12)
    tpot_p99_ms: float | None
    outcome: str  # feasible | infeasible
    pareto_optimal: bool  # among the study's Pareto-optimal trials (pareto studies; Optuna's best_trials)
    on_ttft_curve: bool  # on the P99 TTFT vs PEFT samples/s trade-off curve (results.tradeoff_curve)
    on_tpot_curve: bool
    pause_points: tuple[int, int] | None = None  # LLMStation: per forward pass, per backward pass

    @property
    def pause_points_per_step(self) -> int | None:
        return sum(self.pause_points) if self.pause_points is not None else None


@dataclass(frozen=True)
class FigureData:
    """Everything a figure shows, and its caption."""

    figure: str
    hardware: str
    backend: str
    slo_text: str  # "P99 TTFT <= 500 ms, P99 TPOT <= 50 ms"
    trainer_alone_samples_per_s: float | None  # the ceiling line
    rows: tuple[FigureRow, ...]
    points: tuple[TrialPoint, ...] = ()  # fig10, fig12: every measured trial
    slo_ms: tuple[float, float] | None = None  # (P99 TTFT, P99 TPOT) limits where every study has the same

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(r.system for r in self.rows))

    @property
    def rates(self) -> list[float]:
        return sorted({r.rate_req_s for r in self.rows})

    @property
    def groups(self) -> list[tuple[float, str]]:
        """The points systems are compared at (rate, LoRA setting), in the order the rows have them."""
        return sorted(dict.fromkeys(r.group for r in self.rows), key=lambda g: (g[0], _group_order(g[1])))


def _group_order(label: str) -> tuple[int, int]:
    """fig13's groups in the paper's order: uniform, skewed, none; rank up."""
    if not label:
        return (0, 0)
    dist, _, rank = label.partition(" r")
    return (LORA_DISTS.index(dist) if dist in LORA_DISTS else len(LORA_DISTS), int(rank or 0))


def study_row(result: StudyResult) -> FigureRow:
    """A study's point: its best feasible trial, or 0 samples/s where none met the SLO."""
    cfg = result.config
    finished = [r for r in result.rows if r.state == "COMPLETE"]
    best = result.best
    ceiling = result.trainer_alone_samples_per_s
    return FigureRow(
        system=str(cfg.get("system")),
        rate_req_s=float(cfg.get("rate_req_s", 0.0)),
        best_knobs=dict(best.params) if best is not None else None,
        peft_samples_per_s=best.peft_samples_per_s if best is not None else 0.0,
        ttft_p99_ms=best.metrics.ttft_p99_ms if best is not None else None,
        tpot_p99_ms=best.metrics.tpot_p99_ms if best is not None else None,
        feasible_trials=sum(r.feasible for r in finished),
        trials=len(finished),
        trainer_alone_samples_per_s=float(ceiling) if ceiling is not None else None,
        lora_dist=cfg.get("lora_dist"),
        lora_rank=cfg.get("lora_rank") if cfg.get("lora_dist") is not None else None,
        pareto_optimal=len(result.pareto_numbers) if result.objective == "pareto" else None,
    )


def trial_points(result: StudyResult) -> list[TrialPoint]:
    """Every measured trial of a study (crashed and interrupted ones left out), by number."""
    cfg = result.config
    measured = [r for r in result.rows if r.outcome in ("feasible", "infeasible")]
    curves = {m: {r.number for r in tradeoff_curve(measured, latency=m)} for m in ("ttft_p99_ms", "tpot_p99_ms")}
    pareto = set(result.pareto_numbers)
    system = str(cfg.get("system"))
    layers = resolve_model(cfg["model"]).num_layers if cfg.get("model") else None
    out = []
    for r in measured:
        pauses = None
        if layers is not None and "forward_tasklets" in r.params:
            pauses = get_system(system).policy(r.params).pause_points(layers)
        out.append(TrialPoint(system=system, rate_req_s=float(cfg.get("rate_req_s", 0.0)), number=r.number,
                              params=dict(r.params), peft_samples_per_s=r.peft_samples_per_s,
                              ttft_p99_ms=r.metrics.ttft_p99_ms, tpot_p99_ms=r.metrics.tpot_p99_ms,
                              outcome=r.outcome, pareto_optimal=r.number in pareto,
                              on_ttft_curve=r.number in curves["ttft_p99_ms"],
                              on_tpot_curve=r.number in curves["tpot_p99_ms"], pause_points=pauses))
    return out


def llmstation_ratio(reference_samples_per_s: float | None, samples_per_s: float) -> float | None:
    """LLMStation's PEFT under the SLO over another system's at the same rate:
    inf where that one is 0 and LLMStation's is not; None (blank) where both
    are 0 or LLMStation has no point at that rate."""
    if reference_samples_per_s is None:
        return None
    if samples_per_s > 0:
        return reference_samples_per_s / samples_per_s
    return math.inf if reference_samples_per_s > 0 else None


def figure_rows(results: Iterable[StudyResult], systems: Sequence[str] | None = None) -> list[FigureRow]:
    """One row per (system, rate), in ``systems`` order (default: as the
    studies come, LLMStation first), rates ascending, each with its
    ``llmstation_ratio`` (blank for LLMStation itself)."""
    rows = [study_row(r) for r in results]
    order = list(systems) if systems is not None else list(dict.fromkeys(
        [REFERENCE_SYSTEM] * any(r.system == REFERENCE_SYSTEM for r in rows) + [r.system for r in rows]))
    reference = {r.group: r.peft_samples_per_s for r in rows if r.system == REFERENCE_SYSTEM}
    out = []
    for row in sorted(rows, key=lambda r: (order.index(r.system) if r.system in order else len(order),
                                           r.rate_req_s, _group_order(r.group[1]))):
        ratio = None if row.system == REFERENCE_SYSTEM else llmstation_ratio(reference.get(row.group),
                                                                             row.peft_samples_per_s)
        out.append(replace(row, llmstation_ratio=ratio))
    return out


def slo_text(results: Sequence[StudyResult]) -> str:
    """The studies' SLO in a few words: the limits in ms where every study has
    the same, otherwise what they are relative to."""
    slos = [r.slo for r in results if r.slo]
    if not slos:
        return "no SLO"
    parts = []
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT")):
        values = {round(s[f"{metric}_p99_ms"], 6) for s in slos}
        if len(values) == 1:
            parts.append(f"P99 {label} <= {_num(values.pop())} ms")
        else:  # relative to serving alone: other ms at each rate
            basis = slos[0][f"{metric}_basis"].split(" (")[0]
            parts.append(f"P99 {label} <= {basis}")
    return ", ".join(parts)


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"


def figure_data(figure: str, results: Sequence[StudyResult], systems: Sequence[str] | None = None) -> FigureData:
    """The rows and the caption of ``figure`` from its studies."""
    backends = [r.config.get("backend", {}) for r in results]
    hardware = next((b.get("hardware") for b in backends if b.get("hardware")), "unknown hardware")
    backend = next((b.get("backend") for b in backends if b.get("backend")), "sim")
    rows = figure_rows(results, systems)
    ceilings = [r.trainer_alone_samples_per_s for r in rows if r.trainer_alone_samples_per_s]
    points = [p for r in results for p in trial_points(r)] if figure in ("fig10", "fig12") else []
    order = [r.system for r in rows]
    points.sort(key=lambda p: (order.index(p.system) if p.system in order else len(order), p.number))
    limits = {(round(s["ttft_p99_ms"], 6), round(s["tpot_p99_ms"], 6)) for s in (r.slo for r in results) if s}
    return FigureData(figure=figure, hardware=str(hardware), backend=str(backend), slo_text=slo_text(results),
                      trainer_alone_samples_per_s=max(ceilings) if ceilings else None, rows=tuple(rows),
                      points=tuple(points), slo_ms=limits.pop() if len(limits) == 1 else None)


# ---------------------------------------------------------------- CSV and table


def _cell(x: float | None, fmt: str = ".6g") -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf"
    return format(x, fmt)


def csv_text(rows: Sequence[FigureRow]) -> str:
    """FIG.csv: ``CSV_COLUMNS`` (with ``LORA_COLUMNS`` after the system where
    the rows have them, fig13); the knobs as JSON, blank (with the latencies)
    where no setting met the SLO and the PEFT throughput counts as 0."""
    lora = any(r.lora_dist is not None for r in rows)
    lines = []
    for r in rows:
        lines.append([r.system, *((r.lora_dist, r.lora_rank if r.lora_dist != "none" else "") if lora else ()),
                      f"{r.rate_req_s:g}", json.dumps(r.best_knobs) if r.best_knobs is not None else "",
                      _cell(r.peft_samples_per_s), _cell(r.ttft_p99_ms), _cell(r.tpot_p99_ms),
                      r.feasible_trials, r.trials, _cell(r.llmstation_ratio, ".4g")])
    return _csv((CSV_COLUMNS[0], *(LORA_COLUMNS if lora else ()), *CSV_COLUMNS[1:]), lines)


def points_csv_text(figure: str, points: Sequence[TrialPoint], ceiling: float | None = None) -> str:
    """fig10.csv (``TRADEOFF_COLUMNS``) or fig12.csv (``PAUSE_COLUMNS``): one row per measured trial."""
    if figure == "fig12":
        return _csv(PAUSE_COLUMNS, [
            [p.system, p.number, _cell(p.params.get("forward_tasklets")), _cell(p.params.get("backward_tasklets")),
             *(p.pause_points or ("", "")), _cell(p.pause_points_per_step), _cell(p.peft_samples_per_s),
             _cell(ceiling)] for p in points])
    return _csv(TRADEOFF_COLUMNS, [
        [p.system, f"{p.rate_req_s:g}", p.number, json.dumps(p.params), _cell(p.peft_samples_per_s),
         _cell(p.ttft_p99_ms), _cell(p.tpot_p99_ms), p.outcome, int(p.pareto_optimal), int(p.on_ttft_curve),
         int(p.on_tpot_curve)] for p in points])


def figure_csv_text(data: FigureData) -> str:
    """The figure's CSV: per trial for fig10 and fig12, per study otherwise."""
    if data.figure in ("fig10", "fig12"):
        return points_csv_text(data.figure, data.points, data.trainer_alone_samples_per_s)
    return csv_text(data.rows)


def _csv(columns: Sequence[str], lines: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(lines)
    return buf.getvalue()


def write_text(path: Path, text: str) -> None:
    """Atomically: a file is replaced whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, f"cannot write {path}") from None


def comparison_text(data: FigureData) -> str:
    """Per rate (fig13: per LoRA setting): each system's PEFT samples/s under
    the SLO, and LLMStation's over it."""
    systems, groups = data.systems, data.groups
    at = {(r.system, r.group): r for r in data.rows}
    lora = any(label for _, label in groups)
    lines = [f"{data.figure}, {data.backend} on {data.hardware}, SLO {data.slo_text}",
             f"PEFT samples/s under the SLO (0: no setting met it); in brackets {REFERENCE_SYSTEM}'s / this system's:"]
    width = max(18, *(len(s) + 2 for s in systems))
    first = 18 if lora else 12
    lines.append(("rate, adapters" if lora else "rate req/s").ljust(first)
                 + "".join(s.ljust(width) for s in systems).rstrip())
    for group in groups:
        cells = []
        for s in systems:
            row = at.get((s, group))
            if row is None:
                cells.append("-")
                continue
            cell = f"{row.peft_samples_per_s:.3f}"
            if row.llmstation_ratio is not None:
                cell += " (inf)" if math.isinf(row.llmstation_ratio) else f" ({row.llmstation_ratio:.3g}x)"
            cells.append(cell)
        head = f"{group[0]:g} {group[1]}" if lora else f"{group[0]:g}"
        lines.append(head.ljust(first) + "".join(c.ljust(width) for c in cells).rstrip())
    if data.trainer_alone_samples_per_s:
        lines.append(f"trainer alone (the ceiling): {data.trainer_alone_samples_per_s:.3f} samples/s")
    return "\n".join(lines)


def tradeoff_text(data: FigureData) -> str:
    """fig10: per system, the trials on each trade-off curve and the Pareto-optimal ones."""
    lines = [f"{data.figure}, {data.backend} on {data.hardware}, SLO {data.slo_text}",
             "trade-off curves (trials no other beats on both PEFT samples/s and that latency, feasible or not):"]
    for system in data.systems:
        pts = [p for p in data.points if p.system == system]
        for label, on in (("P99 TTFT", lambda p: p.on_ttft_curve), ("P99 TPOT", lambda p: p.on_tpot_curve)):
            curve = sorted((p for p in pts if on(p)), key=lambda p: p.peft_samples_per_s)
            metric = "ttft_p99_ms" if label == "P99 TTFT" else "tpot_p99_ms"
            cells = ", ".join(f"{p.peft_samples_per_s:.3f}/s at {_cell(getattr(p, metric), '.4g')} ms" for p in curve)
            lines.append(f"  {system} {label}: {cells or 'no measured trial'}")
        front = [p for p in pts if p.pareto_optimal]
        lines.append(f"  {system}: {len(front)} Pareto-optimal feasible trials of {len(pts)} measured")
    return "\n".join(lines)


def pauses_text(data: FigureData) -> str:
    """fig12: PEFT samples/s per setting, and its share of the trainer alone (no pause point)."""
    ceiling = data.trainer_alone_samples_per_s
    lines = [f"{data.figure}, {data.backend} on {data.hardware}: LLMStation alone (nothing served)",
             "tasklets between pauses   pause points per step (fwd+bwd)   PEFT samples/s   of trainer alone"]
    for p in sorted(data.points, key=lambda p: -(p.pause_points_per_step or 0)):
        share = f"{p.peft_samples_per_s / ceiling:.1%}" if ceiling else "-"
        fwd, bwd = p.pause_points or (0, 0)
        lines.append(f"{_cell(p.params.get('forward_tasklets')):<26}{f'{fwd + bwd} ({fwd}+{bwd})':<34}"
                     f"{p.peft_samples_per_s:<17.3f}{share}")
    if ceiling:
        lines.append(f"trainer alone, no pause point: {ceiling:.3f} samples/s")
    return "\n".join(lines)


def figure_text(data: FigureData) -> str:
    """What the figure command prints at the end."""
    if data.figure == "fig10":
        return tradeoff_text(data)
    if data.figure == "fig12":
        return pauses_text(data)
    return comparison_text(data)


def finished_line(row: FigureRow) -> str:
    """One line for a study that finished (``--plain``, or not a terminal)."""
    where = f"{row.rate_req_s:g} req/s" + (f", adapters {lora_label(row.lora_dist, row.lora_rank)}"
                                           if row.lora_dist is not None else "")
    head = f"{row.system} at {where}" if row.rate_req_s > 0 else f"{row.system}, no serving"
    head += f": {row.trials} trials, {row.feasible_trials} feasible"
    head += f", {row.pareto_optimal} Pareto-optimal; " if row.pareto_optimal is not None else "; "
    if not row.feasible:
        return head + "no setting meets the SLO; PEFT throughput counts as 0"
    if row.ttft_p99_ms is None:
        return head + f"best {row.peft_samples_per_s:.3f} PEFT samples/s"
    return (head + f"best {row.peft_samples_per_s:.3f} PEFT samples/s (P99 TTFT {_cell(row.ttft_p99_ms, '.1f')} ms, "
            f"P99 TPOT {_cell(row.tpot_p99_ms, '.2f')} ms)")
