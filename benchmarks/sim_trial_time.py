"""Wall time of one simulated trial, per system, in-process.

Workload: fig8a (ShareGPT-like prompts, Poisson arrivals) at the H100 preset
rate, the system's default knobs (the artifact's example values), workload
seed 0, no simulator noise. Timed: ``backend.run_trial(spec)`` only (the
workload is built once, outside the timing), with ``time.perf_counter``;
one untimed warm-up run first, then the median of ``--runs`` runs.
Sizes: 200 requests (the issue's target: <= 0.2 s per trial) and 2400
requests (fig8a's prompt count at 12 req/s, 200 x rate; FineInfer's is 400 x rate).

    python benchmarks/sim_trial_time.py            # writes benchmarks/results/sim_trial_time.{json,md}
    python benchmarks/sim_trial_time.py --runs 5 --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from autotune.backends import make_backend
from autotune.study import StudyConfig, prepare, trial_spec
from autotune.systems import SYSTEMS

#: The hardware profile the committed results were measured on (the simulator's default
#: was h100-80gb then); pinned so a rerun measures the same thing.
PROFILE = "h100-80gb"

TARGET_200_S = 0.2  # s per 200-request trial (issue 2, "Benchmarks")
SIZES = (200, 2400)  # requests per trial
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "optuna": optuna.__version__,
        "loadavg_1m_at_start": None if load is None else round(load[0], 2),
    }


def command_line() -> str:
    """This run's command, relative to the repository root."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    return " ".join(["python", script.as_posix(), *sys.argv[1:]])


def time_trials(system: str, num_prompts: int, runs: int, runs_dir: Path) -> dict[str, object]:
    backend = make_backend("sim", profile=PROFILE)
    config = StudyConfig(system=system, figure="fig8a", num_prompts=num_prompts, runs_dir=runs_dir,
                         study_name=f"timing-{system}-{num_prompts}")
    ctx = prepare(config, backend)
    spec = trial_spec(ctx, ctx.space.defaults(), 0)
    result = backend.run_trial(spec)  # warm-up, untimed
    times_s = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run_trial(spec)
        times_s.append(time.perf_counter() - t0)
    m = result.metrics()
    return {
        "system": system,
        "requests": len(ctx.workload),
        "rate_req_s": ctx.rate_req_s,
        "rate_basis": ctx.rate_basis,
        "params": ctx.space.defaults(),
        "runs": runs,
        "median_s": statistics.median(times_s),
        "min_s": min(times_s),
        "max_s": max(times_s),
        "times_s": times_s,
        "sim_events": m.get("sim_events"),
        "sim_clock_s": m.get("sim_clock_s"),
        "peft_samples_per_s": m.get("peft_samples_per_s"),
        "error": result.error,
    }


def markdown(report: dict) -> str:
    mach = report["machine"]
    lines = [
        "# Simulated trial wall time",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu_model']}), Python {mach['python']}, "
        f"Optuna {mach['optuna']}, {mach['platform']}; 1-min load average at start {mach['loadavg_1m_at_start']}.",
        "",
        f"fig8a workload (synthetic ShareGPT-like prompts, Poisson arrivals) at the H100 preset rate, "
        f"default knobs, no noise; in-process `backend.run_trial`, one warm-up run then the median of "
        f"{report['runs']} runs (`time.perf_counter`). Target: <= {TARGET_200_S} s per 200-request trial.",
        "",
        "| system | requests | rate (req/s) | median (s) | min..max (s) | simulated s | events | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        target = ""
        if r["requests"] == 200:
            target = "met" if r["median_s"] <= TARGET_200_S else "MISSED"
        lines.append(
            f"| {r['system']} | {r['requests']} | {r['rate_req_s']:g} | {r['median_s']:.3f} | "
            f"{r['min_s']:.3f}..{r['max_s']:.3f} | {r['sim_clock_s']:.1f} | {int(r['sim_events'])} | {target} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per (system, size)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    report = {
        "benchmark": "sim_trial_time",
        "command": command_line(),
        "machine": machine(),
        "runs": args.runs,
        "target_200_requests_s": TARGET_200_S,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for system in SYSTEMS:
            for n in SIZES:
                r = time_trials(system, n, args.runs, Path(tmp))
                print(f"{system:15s} {r['requests']:5d} requests: median {r['median_s']:.3f} s "
                      f"({r['min_s']:.3f}..{r['max_s']:.3f})", flush=True)
                report["results"].append(r)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sim_trial_time.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out_dir / "sim_trial_time.md").write_text(markdown(report), encoding="utf-8")
    print(f"written to {args.out_dir}/sim_trial_time.{{json,md}}")


if __name__ == "__main__":
    main()
