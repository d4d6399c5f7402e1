"""Score the simulator against GPU rows (``benchmarks/gpu/fidelity.py``).

    python -m benchmarks.fidelity.score --gpu OUT.json --profile h100-80gb \
        --slo-ttft-ratio 1.25 --slo-tpot-ratio 1.1 \
        --out benchmarks/results/fidelity/HARDWARE.json --md benchmarks/results/fidelity/HARDWARE.md
    python -m benchmarks.fidelity.score --gpu A.json --profile PA --gpu B.json --profile PB ...

Several rows files (sittings on the same kind of GPU, possibly on hosts of
different speed) score as one table, each against its own profile: the
profile calibrated in that sitting (one ``--profile`` for all, or one per
``--gpu``, in order). Knob directions compare settings of the same file only.

For each GPU row: the SLO in ms (ratio x the GPU serving-alone reference's
P99 for the row's system, figure, rate and workload, or ``--slo-ttft-ms`` /
``--slo-tpot-ms``), the GPU figure (median of its runs, with min and max),
and the simulator's on the same trial spec. Errors are sim / gpu - 1; the
targets are judged on the held-out rows (all rows with ``--held-out-all``,
or when none is held out).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.study import workload_digest
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialResult
from benchmarks.fidelity.compare import (
    ERROR_TARGETS,
    METRIC_TITLES,
    METRICS,
    VERDICT_TARGET,
    knob_agreement,
    knob_moves,
    meets_slo,
    relative_error,
    summarize,
)
from benchmarks.fidelity.rows import (
    RowsFile,
    Setting,
    median_and_spread,
    row_setting,
    spec_for,
    study_context,
    write_json_atomic,
)

NA_NOTE = ("Error = sim / gpu - 1. Where the GPU value is 0 or missing (crashed runs, no reference) the error is "
           "n/a and left out of every median.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", type=Path, action="append", required=True,
                    help="rows file written by benchmarks/gpu/fidelity.py (repeat for several sittings)")
    ap.add_argument("--profile", action="append", default=None,
                    help="simulator profile: packaged name or .toml path (default: the simulator's); "
                         "one for every --gpu, or one each, in order")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs the simulator models (if it takes the option)")
    ap.add_argument("--slo-ttft-ratio", type=float, default=1.25)
    ap.add_argument("--slo-tpot-ratio", type=float, default=1.1)
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="absolute P99 TTFT limit; overrides the ratio")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="absolute P99 TPOT limit; overrides the ratio")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/fidelity/<hardware>.json")
    ap.add_argument("--md", type=Path, default=None, help="default: --out with .md")
    ap.add_argument("--held-out-all", action="store_true", help="count every row as held out")
    return ap.parse_args(argv)


def make_sim(profile: str | None, gpus: int | None):
    """The simulator backend; ``gpus`` only where asked for (and one line if it is not taken)."""
    from autotune.backends import make_backend

    options: dict[str, Any] = {"profile": profile}
    if gpus is not None:
        options["gpus"] = gpus
    try:
        return make_backend("sim", **options)
    except TypeError:
        raise UserError(f"this simulator does not take --gpus ({gpus}); leave it out") from None


def _serving_reference(rows: RowsFile, setting: Setting, digest: str) -> dict[str, Any] | None:
    """The latest GPU serving-alone reference that measured this setting's server and workload (or that
    its study held this workload's runs to: ``slo_for_workload_digests``, a ``--confirm`` run's fresh workload)."""
    found = None
    for ref in rows.references:
        if ref.get("kind", "serving_alone") != TrialKind.SERVING_ALONE.value or ref.get("error"):
            continue
        if (setting.system in ref.get("systems", [ref.get("system")]) and ref.get("figure") == setting.figure
                and float(ref.get("rate_req_s", -1)) == setting.rate_req_s
                and digest in ref.get("slo_for_workload_digests", [ref.get("workload_digest")])):
            found = ref
    return found


def _slo(args: argparse.Namespace, ref: Mapping[str, Any] | None) -> dict[str, Any]:
    def one(absolute: float | None, ratio: float, metric: str) -> tuple[float | None, str]:
        if absolute is not None:
            return absolute, "absolute"
        value = ref.get(metric) if ref is not None else None
        if not value:
            return None, "no GPU serving-alone reference"
        return ratio * float(value), f"{ratio:g}x GPU serving-alone P99 ({float(value):.2f} ms)"

    ttft, ttft_basis = one(args.slo_ttft_ms, args.slo_ttft_ratio, "ttft_p99_ms")
    tpot, tpot_basis = one(args.slo_tpot_ms, args.slo_tpot_ratio, "tpot_p99_ms")
    return {"ttft_p99_ms": ttft, "tpot_p99_ms": tpot, "ttft_basis": ttft_basis, "tpot_basis": tpot_basis}


def _sim_figures(result: TrialResult) -> dict[str, Any]:
    m = result.metrics()
    out: dict[str, Any] = {k: (m.get(k) if result.error is None else None) for k in METRICS}
    out["failed"] = int(m["failed"]) if "failed" in m else None
    out["error"] = result.error
    return out


def score_row(row: Mapping[str, Any], rows: RowsFile, held_out: bool, args: argparse.Namespace, sim,
              sim_references: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row of the comparison: SLO, GPU median and spread, simulator, errors, verdicts."""
    setting = row_setting(row, held_out)
    ctx = study_context(setting)
    digest = workload_digest(ctx.workload)
    ref = _serving_reference(rows, setting, digest)
    slo = _slo(args, ref)

    ok = [r for r in row["runs"] if not r.get("error")]
    gpu: dict[str, Any] = {"runs": len(ok), "crashed_runs": len(row["runs"]) - len(ok),
                           "run_errors": [r["error"] for r in row["runs"] if r.get("error")], "spread": {}}
    for m in (*METRICS, "ttft_p50_ms", "tpot_p50_ms"):
        median, low, high = median_and_spread(r.get(m) for r in ok)
        gpu[m] = median
        if m in METRICS:
            gpu["spread"][m] = [low, high] if median is not None else None
    gpu["failed"] = median_and_spread(r.get("failed") for r in ok)[0]

    simmed = _sim_figures(sim.run_trial(spec_for(setting, TrialKind.COLOCATED, 0, ctx)))
    if digest not in sim_references:  # the simulator's own serving alone, for reading the SLO
        sim_ref = sim.run_trial(spec_for(setting, TrialKind.SERVING_ALONE, 0, ctx)).metrics()
        sim_references[digest] = {k: sim_ref.get(k) for k in ("ttft_p99_ms", "tpot_p99_ms")}

    return {
        "system": setting.system, "figure": setting.figure, "rate_req_s": setting.rate_req_s,
        "params": dict(setting.params), "num_prompts": setting.num_prompts, "trial_seconds": setting.trial_seconds,
        "held_out": held_out,
        "slo": slo,
        "gpu": gpu,
        "sim": simmed,
        "error": {m: relative_error(simmed[m], gpu[m]) for m in METRICS},
        "verdict": {
            "gpu": meets_slo(gpu["ttft_p99_ms"], gpu["tpot_p99_ms"], slo["ttft_p99_ms"], slo["tpot_p99_ms"],
                             gpu["failed"]),
            "sim": meets_slo(simmed["ttft_p99_ms"], simmed["tpot_p99_ms"], slo["ttft_p99_ms"], slo["tpot_p99_ms"],
                             simmed["failed"]),
        },
        "reference": {"gpu": {k: ref.get(k) for k in ("ttft_p99_ms", "tpot_p99_ms")} if ref else None,
                      "sim": sim_references[digest]},
    }


def sittings(args: argparse.Namespace) -> list[tuple[Path, str | None]]:
    """Each rows file with the profile it is scored against."""
    profiles = args.profile or [None]
    if len(profiles) == 1:
        profiles = profiles * len(args.gpu)
    if len(profiles) != len(args.gpu):
        raise UserError(f"{len(args.gpu)} --gpu files and {len(profiles)} --profile: give one profile, or one each")
    return list(zip(args.gpu, profiles))


def score(files: Sequence[tuple[Path, RowsFile, str | None]], args: argparse.Namespace) -> dict[str, Any]:
    gpus = {rows.machine.split(" (")[0] for _, rows, _ in files}  # "NVIDIA H200 (143771 MiB) x1, ..."
    if len(gpus) != 1:
        raise UserError(f"the rows files were measured on different GPUs: {', '.join(sorted(gpus))}")
    out_rows, not_run, moves, sims, gpu_rows = [], [], [], [], []
    for path, rows, profile in files:
        held = {}
        for d in rows.settings:
            s = Setting.from_dict(d, "rows file setting")
            held[s.key] = s.held_out
        sim = make_sim(profile, args.gpus)
        sims.append(sim.describe())
        file_rows = []
        sim_references: dict[str, dict[str, Any]] = {}
        for row in rows.rows:
            setting = row_setting(row)
            if not row["runs"]:
                not_run.append(f"{setting.describe()} ({path.name})")
                continue
            held_out = True if args.held_out_all else held.get(setting.key, True)
            scored = score_row(row, rows, held_out, args, sim, sim_references)
            file_rows.append({**scored, "gpu_file": path.name, "profile": sims[-1].get("profile")})
        order = {r["system"]: [k.name for k in get_system(r["system"]).knobs] for r in file_rows}
        moves += knob_moves([{**r, "gpu_spread": r["gpu"]["spread"]} for r in file_rows], order)
        out_rows += file_rows
        gpu_rows.append({"file": path.name, "profile": sims[-1].get("profile"), "machine": rows.machine,
                         "started": rows.started, "command": rows.command})
    held_rows = [r for r in out_rows if r["held_out"]]
    names = list(dict.fromkeys(d.get("profile") for d in sims))
    return {
        "hardware": files[-1][1].hardware,  # the name the GPU backend gives it now
        "profile": names[0] if len(names) == 1 else names,
        "simulator": [{k: v for k, v in d.items() if k not in ("provenance",)} for d in sims],
        "gpu_rows": gpu_rows,  # one per rows file (sitting)
        "slo": {"ttft_ratio": args.slo_ttft_ratio, "tpot_ratio": args.slo_tpot_ratio,
                "ttft_p99_ms": args.slo_ttft_ms, "tpot_p99_ms": args.slo_tpot_ms},
        "rows": out_rows,
        "knob_moves": moves,
        "summary": {
            "targets_on": "held_out" if held_rows else "all",
            "held_out": summarize(held_rows),
            "all": summarize(out_rows),
            "knob_agreement": knob_agreement(moves),
            "not_run": not_run,
            "note": NA_NOTE,
        },
    }


# ---------------------------------------------------------------- Markdown


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.0f}%"


def _verdict(x: bool | None) -> str:
    return "n/a" if x is None else ("meets" if x else "misses")


def _params(params: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in params.items())


_DIGITS = {"ttft_p99_ms": 1, "tpot_p99_ms": 2, "peft_samples_per_s": 3}


def _gpu_cell(gpu: Mapping[str, Any], m: str) -> str:
    spread = gpu["spread"].get(m)
    d = _DIGITS[m]
    if gpu[m] is None:
        return "n/a"
    return f"{gpu[m]:.{d}f} [{spread[0]:.{d}f}..{spread[1]:.{d}f}]"


def _met(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "no")


def markdown(result: Mapping[str, Any]) -> str:
    s = result["summary"]
    slo = result["slo"]
    slo_text = (f"P99 TTFT {slo['ttft_p99_ms']:g} ms" if slo["ttft_p99_ms"] is not None
                else f"P99 TTFT <= {slo['ttft_ratio']:g}x") + ", " + (
        f"P99 TPOT {slo['tpot_p99_ms']:g} ms" if slo["tpot_p99_ms"] is not None
        else f"P99 TPOT <= {slo['tpot_ratio']:g}x")
    sittings_ = result["gpu_rows"]
    several = len(sittings_) > 1
    lines = [f"# Simulator vs GPU: {result['hardware']}", ""]
    lines += [f"Simulator profile `{g['profile']}` against the GPU rows `{g['file']}` "
              f"(measured {g['started']} on {g['machine']})." for g in sittings_]
    lines += [
        f"SLO per row: {slo_text} (ratios: of the GPU serving-alone reference's P99 for the row's system, figure, "
        "rate and workload). GPU figures: median of the runs [min..max]; the simulator runs the same trial spec. "
        "Verdict: both P99s within the SLO and no request failed, GPU (median) / sim.",
        NA_NOTE,
        "",
        ("| rows file (profile) " if several else "")
        + "| system | figure | rate req/s | knobs | held out | SLO TTFT / TPOT ms | GPU P99 TTFT ms | sim | error "
        "| GPU P99 TPOT ms | sim | error | GPU PEFT samples/s | sim | error | verdict GPU / sim |",
        ("|---" if several else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [r["system"], r["figure"], f"{r['rate_req_s']:g}", _params(r["params"]),
                 "yes" if r["held_out"] else "no",
                 f"{_num(r['slo']['ttft_p99_ms'])} / {_num(r['slo']['tpot_p99_ms'], 2)}"]
        for m in METRICS:
            cells += [_gpu_cell(r["gpu"], m), _num(r["sim"][m], _DIGITS[m]), _pct(r["error"][m])]
        cells.append(f"{_verdict(r['verdict']['gpu'])} / {_verdict(r['verdict']['sim'])}")
        if r["gpu"]["crashed_runs"]:
            cells[3] += f" ({r['gpu']['crashed_runs']} GPU run(s) crashed)"
        if r["sim"]["error"]:
            cells[3] += f" (sim: {r['sim']['error']})"
        if several:
            cells.insert(0, f"{r['gpu_file']} (`{r['profile']}`)")
        lines.append("| " + " | ".join(cells) + " |")
    if s["not_run"]:
        lines += ["", f"Not run on the GPU yet (left out): {'; '.join(s['not_run'])}."]

    basis = s["targets_on"]
    lines += ["", "## Summary", "",
              f"Targets judged on the {'held-out' if basis == 'held_out' else 'all (none is held out)'} settings "
              f"({s[basis]['settings']}).", "",
              "| | median abs error, held out | median abs error, all | target | met |",
              "|---|---|---|---|---|"]
    for m in METRICS:
        h, a = s["held_out"], s["all"]
        lines.append(f"| {METRIC_TITLES[m]} | {_pct_plain(h['median_abs_error'][m])} ({h['errors_counted'][m]} rows) "
                     f"| {_pct_plain(a['median_abs_error'][m])} ({a['errors_counted'][m]} rows) "
                     f"| <= {ERROR_TARGETS[m] * 100:.0f}% | {_met(s[basis]['targets'][m]['met'])} |")
    hv, av = s["held_out"]["verdicts"], s["all"]["verdicts"]
    lines.append(f"| verdicts agree | {hv['agree']}/{hv['total']} ({_pct_plain(hv['share'])}) "
                 f"| {av['agree']}/{av['total']} ({_pct_plain(av['share'])}) | >= {VERDICT_TARGET * 100:.0f}% "
                 f"| {_met(s[basis]['targets']['verdict_agreement']['met'])} |")

    lines += ["", "## Knobs move the simulator as they move the GPU", "",
              "From the setting with the lowest to the one with the highest value of the knob that differs "
              "(the first in the system's knob order when several do): the change, GPU / sim, and whether the "
              "signs agree. \"within spread\": the GPU runs of the two settings overlap, so the GPU's direction "
              "is not resolved.", ""]
    moves = result["knob_moves"]
    if not moves:
        lines.append("No (system, figure, rate) has two settings.")
    else:
        lines += ["| system | figure | rate req/s | knob: low -> high | P99 TTFT GPU / sim | agree "
                  "| P99 TPOT GPU / sim | agree | PEFT GPU / sim | agree |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for mv in moves:
            knob = f"{mv['knob']}: {mv['low']:g} -> {mv['high']:g}"
            if mv["also_changed"]:
                knob += f" (also {', '.join(mv['also_changed'])})"
            cells = [mv["system"], mv["figure"], f"{mv['rate_req_s']:g}", knob]
            for m in METRICS:
                x = mv["metrics"][m]
                cell = f"{_pct(x['gpu_change'])} / {_pct(x['sim_change'])}"
                if x["gpu_resolved"] is False:
                    cell += " (within spread)"
                cells += [cell, _met(x["agree"])]
            lines.append("| " + " | ".join(cells) + " |")
        ka = s["knob_agreement"]
        lines += ["", "Signs agree: " + ", ".join(
            f"{METRIC_TITLES[m]} {ka[m]['agree']}/{ka[m]['total']}" for m in METRICS) + "."]
    return "\n".join(lines) + "\n"


def _pct_plain(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def print_summary(result: Mapping[str, Any], out: Path, md: Path) -> None:
    s = result["summary"]
    basis = s["targets_on"]
    t = s[basis]["targets"]
    met = {True: "met", False: "not met", None: "n/a"}
    parts = [f"{METRIC_TITLES[m]} {_pct_plain(t[m]['value'])} ({met[t[m]['met']]})" for m in METRICS]
    v = s[basis]["verdicts"]
    parts.append(f"verdicts {v['agree']}/{v['total']}")
    print(f"{len(result['rows'])} rows; median |error| on {basis.replace('_', '-')} rows: " + ", ".join(parts))
    print(f"wrote {out} and {md}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for name in ("slo_ttft_ratio", "slo_tpot_ratio", "slo_ttft_ms", "slo_tpot_ms"):
            v = getattr(args, name)
            if v is not None and not v > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {v:g}")
        if args.gpus is not None and args.gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {args.gpus}")
        files = [(path, RowsFile.load(path), profile) for path, profile in sittings(args)]
        result = score(files, args)
        out = args.out or Path("benchmarks/results/fidelity") / f"{result['hardware']}.json"
        md = args.md or out.with_suffix(".md")
        try:
            write_json_atomic(out, result)
            md.parent.mkdir(parents=True, exist_ok=True)
            md.write_text(markdown(result), encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {e.filename}: {e.strerror}") from None
        print_summary(result, out, md)
    except UserError as e:
        print(f"score: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
