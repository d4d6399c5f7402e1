"""The numbers of a figure, computed from the studies alone: one row per
(system, request rate), the CSV and the comparison table read them, and the
plot draws them (compute first, draw second).

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
from autotune.figures import FIGURES, FigurePreset
from autotune.results import StudyResult
from autotune.systems import SYSTEMS

#: The figures ``autotune figure`` draws; the others are studies of another shape.
IN_SCOPE = ("fig8a", "fig9a")
#: The system the others are compared with (its PEFT over theirs, per rate).
REFERENCE_SYSTEM = "llmstation"
#: Columns of FIG.csv, in order.
CSV_COLUMNS = ("system", "rate_req_s", "best_knobs", "peft_samples_per_s", "ttft_p99_ms", "tpot_p99_ms",
               "feasible_trials", "trials", "llmstation_ratio")


# ---------------------------------------------------------------- input


def check_figure(name: str) -> FigurePreset:
    """The preset of a figure ``autotune figure`` draws; one-line errors otherwise."""
    if name in IN_SCOPE:
        return FIGURES[name]
    if name in FIGURES:
        raise UserError(f"not yet: autotune figure draws {', '.join(IN_SCOPE)}; for {name} use the tune command, "
                        f"e.g. autotune llmstation --figure {name}")
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

    @property
    def feasible(self) -> bool:
        return self.best_knobs is not None


@dataclass(frozen=True)
class FigureData:
    """Everything a figure shows, and its caption."""

    figure: str
    hardware: str
    backend: str
    slo_text: str  # "P99 TTFT <= 500 ms, P99 TPOT <= 50 ms"
    trainer_alone_samples_per_s: float | None  # the ceiling line
    rows: tuple[FigureRow, ...]

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(r.system for r in self.rows))

    @property
    def rates(self) -> list[float]:
        return sorted({r.rate_req_s for r in self.rows})


def study_row(result: StudyResult) -> FigureRow:
    """A study's point: its best feasible trial, or 0 samples/s where none met the SLO."""
    cfg = result.config
    finished = [r for r in result.rows if r.state == "COMPLETE"]
    best = result.best
    ceiling = result.references.get("trainer_alone", {}).get("metrics", {}).get("peft_samples_per_s")
    return FigureRow(
        system=str(cfg.get("system")),
        rate_req_s=float(cfg.get("rate_req_s", 0.0)),
        best_knobs=dict(best.params) if best is not None else None,
        peft_samples_per_s=best.peft_samples_per_s if best is not None else 0.0,
        ttft_p99_ms=best.metrics.get("ttft_p99_ms") if best is not None else None,
        tpot_p99_ms=best.metrics.get("tpot_p99_ms") if best is not None else None,
        feasible_trials=sum(r.feasible for r in finished),
        trials=len(finished),
        trainer_alone_samples_per_s=float(ceiling) if ceiling is not None else None,
    )


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
    reference = {r.rate_req_s: r.peft_samples_per_s for r in rows if r.system == REFERENCE_SYSTEM}
    out = []
    for row in sorted(rows, key=lambda r: (order.index(r.system) if r.system in order else len(order), r.rate_req_s)):
        ratio = None if row.system == REFERENCE_SYSTEM else llmstation_ratio(reference.get(row.rate_req_s),
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
    return FigureData(figure=figure, hardware=str(hardware), backend=str(backend), slo_text=slo_text(results),
                      trainer_alone_samples_per_s=max(ceilings) if ceilings else None, rows=tuple(rows))


# ---------------------------------------------------------------- CSV and table


def _cell(x: float | None, fmt: str = ".6g") -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf"
    return format(x, fmt)


def csv_text(rows: Sequence[FigureRow]) -> str:
    """FIG.csv: ``CSV_COLUMNS``; the knobs as JSON, blank (with the latencies)
    where no setting met the SLO and the PEFT throughput counts as 0."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([r.system, f"{r.rate_req_s:g}", json.dumps(r.best_knobs) if r.best_knobs is not None else "",
                    _cell(r.peft_samples_per_s), _cell(r.ttft_p99_ms), _cell(r.tpot_p99_ms),
                    r.feasible_trials, r.trials, _cell(r.llmstation_ratio, ".4g")])
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
    """Per rate: each system's PEFT samples/s under the SLO, and LLMStation's over it."""
    systems, rates = data.systems, data.rates
    at = {(r.system, r.rate_req_s): r for r in data.rows}
    lines = [f"{data.figure}, {data.backend} on {data.hardware}, SLO {data.slo_text}",
             f"PEFT samples/s under the SLO (0: no setting met it); in brackets {REFERENCE_SYSTEM}'s / this system's:"]
    width = max(18, *(len(s) + 2 for s in systems))
    lines.append("rate req/s".ljust(12) + "".join(s.ljust(width) for s in systems).rstrip())
    for rate in rates:
        cells = []
        for s in systems:
            row = at.get((s, rate))
            if row is None:
                cells.append("-")
                continue
            cell = f"{row.peft_samples_per_s:.3f}"
            if row.llmstation_ratio is not None:
                cell += " (inf)" if math.isinf(row.llmstation_ratio) else f" ({row.llmstation_ratio:.3g}x)"
            cells.append(cell)
        lines.append(f"{rate:<12g}" + "".join(c.ljust(width) for c in cells).rstrip())
    if data.trainer_alone_samples_per_s:
        lines.append(f"trainer alone (the ceiling): {data.trainer_alone_samples_per_s:.3f} samples/s")
    return "\n".join(lines)


def finished_line(row: FigureRow) -> str:
    """One line for a study that finished (``--plain``, or not a terminal)."""
    head = f"{row.system} at {row.rate_req_s:g} req/s: {row.trials} trials, {row.feasible_trials} feasible; "
    if not row.feasible:
        return head + "no setting meets the SLO; PEFT throughput counts as 0"
    return (head + f"best {row.peft_samples_per_s:.3f} PEFT samples/s (P99 TTFT {_cell(row.ttft_p99_ms, '.1f')} ms, "
            f"P99 TPOT {_cell(row.tpot_p99_ms, '.2f')} ms)")
