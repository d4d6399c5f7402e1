"""The engine's side of a GPU run, from vLLM's own metrics, beside the simulator's.

    python -m benchmarks.fidelity.engine_metrics --gpu benchmarks/results/fidelity/h200-gpu-rows-sitting3.json \\
        --metrics benchmarks/results/fidelity/h200-runs/sitting3-server-metrics --profile h200 \\
        [--md engine-metrics.md]

The GPU backend saves the server's Prometheus metrics before and after each
run (``server-metrics-before.prom`` / ``-after.prom`` in the run's folder; here
one folder per run, named by its label, with ``before.prom`` and
``after.prom``). Their difference is what that run alone did. vLLM's TTFT is
timed from the request's arrival in the API server to the engine's first
token; its inter-token latency (ITL) is the engine's iteration time as each
request sees it, so an ITL tail is long iterations (prefills) and nothing of
the HTTP side. The histograms' buckets are coarse (TTFT 20/40/60/80/100 ms,
ITL 10/25/50 ms): the table gives the share of requests (TTFT) or tokens (ITL)
above each bound, GPU and simulator, and the means (exact: sum / count).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from autotune.errors import UserError  # noqa: E402
from autotune.sim.backend import SimBackend  # noqa: E402
from autotune.sim.simulation import Simulation  # noqa: E402
from autotune.trial import TrialKind, TrialSpec  # noqa: E402
from benchmarks.fidelity.rows import RowsFile, spec_for, study_context  # noqa: E402

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LE = re.compile(r'le="([^"]+)"')
#: vLLM histograms read, and the bounds (ms) reported for each.
HISTOGRAMS = {"ttft": ("vllm:time_to_first_token_seconds", (40.0, 60.0, 80.0, 100.0)),
              "itl": ("vllm:inter_token_latency_seconds", (10.0, 25.0))}
#: Engine-side means only (no simulator counterpart).
MEANS = {"queue": "vllm:request_queue_time_seconds", "prefill": "vllm:request_prefill_time_seconds"}


def parse_prom(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text: (name, labels) -> value; comments and blank lines skipped."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        name, labels, value = m.groups()
        try:
            out[(name, labels or "")] = float(value)
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Histogram:
    """One histogram's change over a run: count, sum (s), cumulative counts per bound (s)."""

    count: float
    sum_s: float
    cumulative: dict[float, float]

    @classmethod
    def delta(cls, before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float],
              name: str) -> Histogram:
        cum: dict[float, float] = {}
        count = total = 0.0
        for (metric, labels), value in after.items():
            change = value - before.get((metric, labels), 0.0)
            if metric == f"{name}_bucket":
                le = float(_LE.search(labels).group(1))  # type: ignore[union-attr]
                cum[le] = cum.get(le, 0.0) + change
            elif metric == f"{name}_sum":
                total += change
            elif metric == f"{name}_count":
                count += change
        return cls(count, total, dict(sorted(cum.items())))

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.sum_s / self.count if self.count else math.nan

    def share_above(self, bound_ms: float) -> float:
        """Share of observations above ``bound_ms`` (which must be a bucket bound)."""
        le = bound_ms / 1000.0
        match = [v for k, v in self.cumulative.items() if math.isclose(k, le)]
        if not match or not self.count:
            return math.nan
        return 1.0 - match[0] / self.count


def gpu_run(folder: Path) -> dict[str, Histogram]:
    before = parse_prom((folder / "before.prom").read_text())
    after = parse_prom((folder / "after.prom").read_text())
    names = {**{k: v[0] for k, v in HISTOGRAMS.items()}, **MEANS}
    return {key: Histogram.delta(before, after, name) for key, name in names.items()}


def sim_run(backend: SimBackend, spec: TrialSpec) -> dict[str, np.ndarray]:
    """Per-request TTFT and every inter-token gap of the simulated run, ms."""
    out = Simulation(spec, backend.profile).run()
    ok = [r for r in out.records if r.ok]
    return {"ttft": np.array([(r.token_times_s[0] - r.send_s) * 1000.0 for r in ok]),
            "itl": np.concatenate([np.diff(r.token_times_s) * 1000.0 for r in ok])}


def labelled_specs(rows: RowsFile) -> dict[str, TrialSpec]:
    """Every run's label -> the spec it ran (co-located runs and serving-alone references); each
    setting's workload built once."""
    runs = max((len(row["runs"]) for row in rows.rows), default=1)
    out = {}
    for setting in rows.settings_list():
        ctx = study_context(setting)
        for run in range(runs):
            for kind in (TrialKind.COLOCATED, TrialKind.SERVING_ALONE):
                spec = spec_for(setting, kind, run, ctx)
                out[spec.label] = spec
    return out


def compare(rows: RowsFile, metrics_dir: Path, backend: SimBackend) -> list[dict[str, object]]:
    specs = labelled_specs(rows)
    table = []
    for folder in sorted(p for p in metrics_dir.iterdir() if (p / "after.prom").exists()):
        spec = specs.get(folder.name)
        if spec is None:
            continue
        gpu, sim = gpu_run(folder), sim_run(backend, spec)
        row: dict[str, object] = {"run": folder.name}
        for key, (_, bounds) in HISTOGRAMS.items():
            row[f"{key}_mean_ms"] = (gpu[key].mean_ms, float(sim[key].mean()))
            for b in bounds:
                row[f"{key}>{b:g}"] = (gpu[key].share_above(b), float(np.mean(sim[key] > b)))
        for key in MEANS:
            row[f"{key}_mean_ms"] = (gpu[key].mean_ms, None)
        table.append(row)
    return table


def markdown(table: Sequence[Mapping[str, object]], profile: str) -> str:
    if not table:
        return "no run's metrics matched a setting of the rows file\n"
    cols = [c for c in table[0] if c != "run"]
    head = "| run | " + " | ".join(c.replace(">", " > ").replace("_mean_ms", " mean ms") for c in cols) + " |"
    lines = [f"GPU / simulator (`{profile}`); shares above a bound in % of requests (TTFT) or tokens (ITL).", "",
             head, "|" + "---|" * (len(cols) + 1)]
    for row in table:
        cells = []
        for c in cols:
            gpu, sim = row[c]  # type: ignore[misc]
            pct = ">" in c
            fmt = (lambda x: "n/a" if x is None or math.isnan(x) else (f"{100 * x:.1f}" if pct else f"{x:.1f}"))
            cells.append(fmt(gpu) if sim is None else f"{fmt(gpu)} / {fmt(sim)}")
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", type=Path, required=True, help="the rows file the runs belong to")
    ap.add_argument("--metrics", type=Path, required=True, help="one folder per run: before.prom, after.prom")
    ap.add_argument("--profile", default="h200", help="simulator profile (name or file)")
    ap.add_argument("--md", type=Path, help="write the table here too")
    args = ap.parse_args(argv)
    try:
        if not args.metrics.is_dir():
            raise UserError(f"--metrics {args.metrics}: no such folder")
        text = markdown(compare(RowsFile.load(args.gpu), args.metrics, SimBackend(args.profile)), args.profile)
        print(text, end="")
        if args.md is not None:
            try:
                args.md.write_text(text, encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write {args.md}: {e.strerror}") from None
    except UserError as e:
        print(f"engine_metrics: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
