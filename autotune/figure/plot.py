"""Draw a figure's rows: fig8a/fig9a, PEFT samples/s under the SLO against
request rate, one line per system, the trainer alone as a dashed ceiling;
fig13, the same numbers as grouped bars per served LoRA setting; fig10, P99
TTFT and P99 TPOT against PEFT samples/s (every trial, each system's
trade-off curve, the SLO lines); fig12, PEFT samples/s against pause points.

Needs matplotlib (``pip install -e ".[figure]"``); drawn on matplotlib
``Figure`` objects, not pyplot, so it works without a display and leaves the
caller's backend (a notebook's) as it was.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autotune.errors import os_error
from autotune.figure.rows import FigureData, TrialPoint
from autotune.systems import SYSTEMS

#: What to install where matplotlib is missing.
INSTALL_HINT = 'pip install -e ".[figure]"'
#: 8 x 5 inches at 100 dpi: 800 px wide, as it is shown.
SIZE_IN = (8.0, 5.0)
DPI = 100
#: One colour and marker per system, the same in every figure.
STYLE = {
    "llmstation": ("#d62728", "o"),
    "vllm-torchtune": ("#1f77b4", "s"),
    "fineinfer": ("#2ca02c", "^"),
    "chunked": ("#9467bd", "D"),
}
_TITLES = {"fig8a": "Figure 8a", "fig9a": "Figure 9a", "fig10": "Figure 10", "fig12": "Figure 12",
           "fig13": "Figure 13"}
_WORKLOADS = {"fig8a": "ShareGPT, Poisson arrivals", "fig9a": "ShareGPT, BurstGPT arrivals",
              "fig13": "BurstGPT arrivals, 8 LoRA adapters served"}
_HEADLINES = {"fig10": "P99 latency against PEFT throughput, every trial and the trade-off curves",
              "fig12": "the cost of pause points: PEFT throughput with nothing served (LLMStation alone)"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def title_text(data: FigureData) -> str:
    where = f"simulated {data.hardware}" if data.backend == "sim" else data.hardware
    fig = _TITLES.get(data.figure, data.figure)
    if data.figure in _HEADLINES:
        first = f"{fig}: {_HEADLINES[data.figure]}"
    else:
        workload = _WORKLOADS.get(data.figure)
        first = f"{fig}: max PEFT throughput under the SLO" + (f" ({workload})" if workload else "")
    rate = f"{data.rates[0]:g} req/s; " if data.figure in ("fig10", "fig13") and data.rates else ""
    slo = "" if data.figure == "fig12" else f"; {rate}SLO {data.slo_text.replace('<=', '≤')}"
    return f"{first}\n{where}{slo}"


def system_style(system: str, i: int) -> tuple[str, str, str]:
    """(colour, marker, legend name) of a system, the same in every figure."""
    colour, marker = STYLE.get(system, (f"C{i}", "o"))
    return colour, marker, SYSTEMS[system].title if system in SYSTEMS else system


@contextlib.contextmanager
def _figure(size_in: tuple[float, float] = SIZE_IN) -> Iterator[Any]:
    """A matplotlib Figure (no display, nothing global changed) in the house style."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no backend chosen, none changed for the caller

    style = {"svg.fonttype": "none",  # text stays text (searchable, the legend's names readable)
             "svg.hashsalt": "autotune",  # the same ids in every file: the same rows make the same SVG
             "font.size": 11, "axes.titlesize": 11.5, "legend.fontsize": 10}
    with matplotlib.rc_context(style):
        yield Figure(figsize=size_in, dpi=DPI)


@contextlib.contextmanager
def _drawn(data: FigureData) -> Iterator[Any]:
    """The figure of ``data``, drawn, inside the house style (saved there too)."""
    drawers = {"fig10": _draw_tradeoff, "fig12": _draw_pauses, "fig13": _draw_bars}
    size = (11.0, 5.0) if data.figure in ("fig10", "fig13") else SIZE_IN
    with _figure(size) as fig:
        drawers.get(data.figure, _draw_rates)(fig, data)
        yield fig


def draw(data: FigureData, png: Path, svg: Path) -> None:
    """Write ``png`` and ``svg`` of the figure; the SVG keeps its text as text."""
    with _drawn(data) as fig:
        _save(fig, png, svg)


def png_bytes(data: FigureData) -> bytes:
    """The figure as PNG, the same as ``draw`` writes (for a notebook to show)."""
    buf = io.BytesIO()
    with _drawn(data) as fig:
        fig.savefig(buf, format="png", dpi=DPI, metadata=_metadata(".png"))
    return buf.getvalue()


def _legend_below(fig: Any, ax: Any, ncol: int = 3) -> None:
    """The legend in rows under the plot, the plot shrunk to make room."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=10)
    rows_of_legend = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, 0.055 * rows_of_legend * SIZE_IN[1] / fig.get_figheight() + 0.01, 1, 1))


def _save(fig: Any, png: Path, svg: Path) -> None:
    for path in (png, svg):
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=DPI, metadata=_metadata(path.suffix))
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(e, f"cannot write {path}") from None


def _ceiling(ax: Any, data: FigureData, top: float) -> float:
    """The trainer alone as a dashed line; the new top of the data."""
    if not data.trainer_alone_samples_per_s:
        return top
    ceiling = data.trainer_alone_samples_per_s
    ax.axhline(ceiling, color="0.3", linestyle="--", linewidth=1.5, zorder=2,
               label=f"trainer alone ({ceiling:.2f} samples/s)")
    return max(top, ceiling)


def _draw_rates(fig: Any, data: FigureData) -> None:
    """fig8a, fig9a: points where no setting met the SLO are at 0 (hollow markers)."""
    ax = fig.add_subplot()
    for i, system in enumerate(data.systems):
        rows = sorted((r for r in data.rows if r.system == system), key=lambda r: r.rate_req_s)
        colour, marker, label = system_style(system, i)
        # Where systems reach the same numbers their points coincide: each
        # later one smaller and thinner, on top, so that every one shows.
        size, width, z = max(4.0, 11.0 - 2.0 * i), max(1.2, 3.4 - 0.6 * i), 3 + i
        x = [r.rate_req_s for r in rows]
        y = [r.peft_samples_per_s for r in rows]
        ax.plot(x, y, color=colour, marker=marker, markersize=size, linewidth=width, label=label, zorder=z)
        missed = [r for r in rows if not r.feasible]
        if missed:  # hollow: no setting met the SLO there
            ax.plot([r.rate_req_s for r in missed], [0.0] * len(missed), linestyle="none", marker=marker,
                    markersize=size, markerfacecolor="white", markeredgecolor=colour, markeredgewidth=2.0,
                    zorder=z + 0.5)
    top = _ceiling(ax, data, max([r.peft_samples_per_s for r in data.rows] + [0.0]))
    ax.set_ylim(bottom=-0.03 * (top or 1.0), top=1.12 * (top or 1.0))
    rates = data.rates
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    if rates:
        pad = 0.06 * (max(rates) - min(rates) or 1.0)
        ax.set_xlim(min(rates) - pad, max(rates) + pad)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("PEFT throughput under the SLO (samples/s)")
    ax.set_title(title_text(data))
    ax.grid(True, color="0.9", zorder=0)
    if any(not r.feasible for r in data.rows):
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.3",
                label="hollow: no setting meets the SLO (0)")
    _legend_below(fig, ax)


def _draw_bars(fig: Any, data: FigureData) -> None:
    """fig13: one group of bars per served LoRA setting, one bar per system;
    a bar at 0 (no setting met the SLO) is marked with a cross."""
    ax = fig.add_subplot()
    groups, systems = data.groups, data.systems
    at = {(r.system, r.group): r for r in data.rows}
    width = 0.8 / max(1, len(systems))
    top = max([r.peft_samples_per_s for r in data.rows] + [0.0])
    for i, system in enumerate(systems):
        colour, _, label = system_style(system, i)
        xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        rows = [at.get((system, group)) for group in groups]
        ax.bar(xs, [r.peft_samples_per_s if r is not None else 0.0 for r in rows], width=width * 0.95,
               color=colour, label=label, zorder=3)
        missed = [x for x, r in zip(xs, rows) if r is not None and not r.feasible]
        if missed:
            ax.plot(missed, [0.0] * len(missed), linestyle="none", marker="x", markersize=8, markeredgewidth=2,
                    color=colour, zorder=4)
    top = _ceiling(ax, data, top)
    if any(not r.feasible for r in data.rows):
        ax.plot([], [], linestyle="none", marker="x", color="0.3", markeredgewidth=2,
                label="x: no setting meets the SLO (0)")
    ax.set_xticks(range(len(groups)), [label.replace(" r", "\nrank ") if label != "none" else "none\n(base model)"
                                       for _, label in groups])
    ax.set_xlabel("served LoRA adapters: distribution over 8 adapters, rank")
    ax.set_ylabel("PEFT throughput under the SLO (samples/s)")
    ax.set_ylim(0, 1.12 * (top or 1.0))
    ax.set_title(title_text(data))
    ax.grid(True, axis="y", color="0.9", zorder=0)
    _legend_below(fig, ax, ncol=5)


def _draw_tradeoff(fig: Any, data: FigureData) -> None:
    """fig10: two panels, P99 TTFT and P99 TPOT against PEFT samples/s. Every
    measured trial small and faint, each system's trade-off curve as a step
    line through its trials; filled: the trial met the SLO, hollow: it
    missed it; the limit dashed."""
    axes = fig.subplots(1, 2)
    limits = data.slo_ms or (None, None)
    for ax, (metric, label, limit, on) in zip(axes, (
            ("ttft_p99_ms", "P99 TTFT (ms)", limits[0], lambda p: p.on_ttft_curve),
            ("tpot_p99_ms", "P99 TPOT (ms)", limits[1], lambda p: p.on_tpot_curve))):
        values = [getattr(p, metric) for p in data.points if getattr(p, metric) is not None]
        for i, system in enumerate(data.systems):
            colour, marker, name = system_style(system, i)
            pts = [p for p in data.points if p.system == system and getattr(p, metric) is not None]
            curve = sorted((p for p in pts if on(p)), key=lambda p: p.peft_samples_per_s)
            top = 4 + (len(data.systems) - i) / 10  # the first system's curve (LLMStation's) on top
            ax.plot([p.peft_samples_per_s for p in curve], [getattr(p, metric) for p in curve], color=colour,
                    linewidth=2.0, drawstyle="steps-post", zorder=top, label=name)
            for sel, size, alpha, z in ((pts, 18, 0.35, 3), (curve, 48, 1.0, top + 0.05)):
                for feasible in (True, False):
                    chosen = [p for p in sel if (p.outcome == "feasible") == feasible]
                    ax.scatter([p.peft_samples_per_s for p in chosen], [getattr(p, metric) for p in chosen], s=size,
                               marker=marker, alpha=alpha, zorder=z, color=colour if feasible else "white",
                               edgecolors=colour, linewidths=1.3)
        if limit is not None:
            ax.axhline(limit, color="#d62728", linestyle="--", linewidth=1.5, zorder=2)
            ax.annotate(f"SLO {limit:g} ms", xy=(0.01, limit), xycoords=("axes fraction", "data"),
                        xytext=(2, 3), textcoords="offset points", color="#d62728", fontsize=9.5)
            values.append(limit)
        if values and max(values) / max(min(values), 1e-9) > 30:
            ax.set_yscale("log")  # a crash's or a burst's latency next to the rest
        if ax.get_yscale() == "linear" and values:  # room above the highest point and the SLO's label
            ax.set_ylim(0, 1.1 * max(values))
        ax.set_xlabel("PEFT throughput (samples/s)")
        ax.set_ylabel(label)
        ax.grid(True, color="0.9", zorder=0)
    axes[0].plot([], [], linestyle="none", marker="o", markerfacecolor="0.4", markeredgecolor="0.4",
                 label="filled: trial met the SLO")
    axes[0].plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.4",
                 label="hollow: trial missed it")
    axes[0].plot([], [], color="0.4", linewidth=2.0, label="line: trade-off curve (large markers)")
    axes[0].plot([], [], color="#d62728", linestyle="--", label="SLO limit")
    fig.suptitle(title_text(data), fontsize=11.5)
    _legend_below(fig, axes[0], ncol=4)


def _draw_pauses(fig: Any, data: FigureData) -> None:
    """fig12: PEFT samples/s against pause points per training step (log
    scale), the trainer alone (no pause point) dashed."""
    ax = fig.add_subplot()
    colour, marker, name = system_style("llmstation", 0)
    pts = sorted((p for p in data.points if p.pause_points_per_step is not None),
                 key=lambda p: p.pause_points_per_step or 0)
    ax.plot([p.pause_points_per_step for p in pts], [p.peft_samples_per_s for p in pts], color=colour,
            marker=marker, markersize=8, linewidth=2.2, zorder=3, label=f"{name}, nothing served")
    for p in pts:
        ax.annotate(_pause_label(p, data.trainer_alone_samples_per_s), (p.pause_points_per_step,
                    p.peft_samples_per_s), xytext=(0, -12), textcoords="offset points", ha="center", va="top",
                    fontsize=8.5, color="0.3")
    top = _ceiling(ax, data, max([p.peft_samples_per_s for p in pts] + [0.0]))
    ax.set_xscale("log", base=2)
    ticks = [p.pause_points_per_step for p in pts]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.12 * (top or 1.0))
    ax.set_xlabel("pause points per training step (log scale)")
    ax.text(0.01, 0.03, "under each point: pause points per forward + backward pass,\n"
            "and PEFT throughput as a share of the trainer alone", transform=ax.transAxes, fontsize=9, color="0.3")
    ax.set_ylabel("PEFT throughput (samples/s)")
    ax.set_title(title_text(data))
    ax.grid(True, color="0.9", zorder=0)
    _legend_below(fig, ax, ncol=2)


def _pause_label(p: TrialPoint, ceiling: float | None) -> str:
    """``33+32``: pause points per forward + backward pass; with the share of the trainer alone."""
    fwd, bwd = p.pause_points or (0, 0)
    return f"{fwd}+{bwd}" + (f"\n{p.peft_samples_per_s / ceiling:.1%}" if ceiling else "")


def _metadata(suffix: str) -> dict[str, str | None]:
    """No creation date or software version: the same rows make the same files."""
    if suffix == ".svg":
        return {"Date": None, "Creator": None}
    if suffix == ".png":
        return {"Software": None}
    return {}
