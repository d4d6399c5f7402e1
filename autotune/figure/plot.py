"""Draw a figure's rows: PEFT samples/s under the SLO against request rate,
one line per system, the trainer alone as a dashed ceiling.

Needs matplotlib (``pip install -e ".[figure]"``); drawn with the
non-interactive Agg backend, so it works without a display.
"""

from __future__ import annotations

from pathlib import Path

from autotune.errors import os_error
from autotune.figure.rows import FigureData
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
_TITLES = {"fig8a": "Figure 8a", "fig9a": "Figure 9a"}
_WORKLOADS = {"fig8a": "ShareGPT, Poisson arrivals", "fig9a": "ShareGPT, BurstGPT arrivals"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def title_text(data: FigureData) -> str:
    where = f"simulated {data.hardware}" if data.backend == "sim" else data.hardware
    fig = _TITLES.get(data.figure, data.figure)
    workload = _WORKLOADS.get(data.figure)
    first = f"{fig}: max PEFT throughput under the SLO" + (f" ({workload})" if workload else "")
    return f"{first}\n{where}; SLO {data.slo_text.replace('<=', '≤')}"


def draw(data: FigureData, png: Path, svg: Path) -> None:
    """Write ``png`` and ``svg``. Points where no setting met the SLO are at 0
    (hollow markers); the SVG keeps its text as text."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    style = {"svg.fonttype": "none",  # text stays text (searchable, the legend's names readable)
             "svg.hashsalt": "autotune",  # the same ids in every file: the same rows make the same SVG
             "font.size": 11, "axes.titlesize": 11.5, "legend.fontsize": 10}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=SIZE_IN, dpi=DPI)
        ax = fig.add_subplot()
        for i, system in enumerate(data.systems):
            rows = sorted((r for r in data.rows if r.system == system), key=lambda r: r.rate_req_s)
            colour, marker = STYLE.get(system, (f"C{i}", "o"))
            label = SYSTEMS[system].title if system in SYSTEMS else system
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
        top = max([r.peft_samples_per_s for r in data.rows] + [0.0])
        if data.trainer_alone_samples_per_s:
            ceiling = data.trainer_alone_samples_per_s
            ax.axhline(ceiling, color="0.3", linestyle="--", linewidth=1.5, zorder=2,
                       label=f"trainer alone ({ceiling:.2f} samples/s)")
            top = max(top, ceiling)
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
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=10)
        rows_of_legend = -(-len(labels) // 3)
        fig.tight_layout(rect=(0, 0.055 * rows_of_legend + 0.01, 1, 1))
        for path in (png, svg):
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=DPI, metadata=_metadata(path.suffix))
                tmp.replace(path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise os_error(e, f"cannot write {path}") from None


def _metadata(suffix: str) -> dict[str, str | None]:
    """No creation date or software version: the same rows make the same files."""
    if suffix == ".svg":
        return {"Date": None, "Creator": None}
    if suffix == ".png":
        return {"Software": None}
    return {}
