"""Settings run on the GPU, a few times each, for the simulator to be scored
against (``benchmarks/fidelity/score.py``).

    python benchmarks/gpu/fidelity.py --settings benchmarks/fidelity/h200-settings.json --runs 2 \
        --out fidelity-h200.json --max-minutes 7 [--resume] [--references]
    python benchmarks/gpu/fidelity.py --settings FILE.json --runs 2 --dry-run

Settings that need the same vLLM server (the system's memory share and MPS
on or off) run together, so the server restarts as rarely as it can. For each
server and shared workload, the serving-alone reference runs first (the SLO
basis of the scorer), then run 0 of every setting, then run 1, ... Every run
replays the setting's workload with fresh prompt tokens (its own trial seed).
The rows file is rewritten atomically after every trial: a call killed
midway, or stopped by ``--max-minutes``, keeps what it measured, and
``--resume`` continues it. A crashed trial is recorded with its error.
``--references`` adds each system's trainer-alone run (the PEFT ceiling).

Nothing here imports vLLM until the GPU backend is made (``--dry-run`` runs
on any machine).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(_REPO))

from autotune.errors import UserError  # noqa: E402
from autotune.context import StudyContext  # noqa: E402
from autotune.study import workload_digest  # noqa: E402
from autotune.trial import TrialKind, TrialResult  # noqa: E402
from benchmarks.fidelity.rows import (  # noqa: E402
    RowsFile,
    Setting,
    Step,
    describe_server,
    load_settings,
    plan,
    reference_record,
    run_record,
    server_key,
    spec_for,
    study_context,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=Path, required=True, help="JSON list of settings")
    ap.add_argument("--runs", type=int, default=2, help="runs of each setting (default 2)")
    ap.add_argument("--out", type=Path, help="the rows file to write")
    ap.add_argument("--references", action="store_true", help="also each system's trainer-alone run")
    ap.add_argument("--max-minutes", type=float, help="start no trial after this many minutes")
    ap.add_argument("--resume", action="store_true", help="continue --out: run only what it lacks")
    ap.add_argument("--runs-dir", type=Path, default=Path("autotune-runs"), help="GPU backend's logs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; no backend")
    return ap.parse_args(argv)


def _done(rows: RowsFile | None, step: Step) -> bool:
    if rows is None:
        return False
    if step.kind is TrialKind.COLOCATED:
        return rows.has_run(step.setting, step.run)
    return rows.reference(step.reference_key) is not None


def _open_rows(args: argparse.Namespace, settings: list[Setting]) -> RowsFile | None:
    """The rows file to continue (``--resume``), or None for a new one."""
    if args.out is None or not args.out.exists():
        return None
    if not args.resume:
        if args.dry_run:
            return None
        raise UserError(f"{args.out} exists; pass --resume to continue it, or another --out")
    rows = RowsFile.load(args.out)
    theirs = {s.key for s in rows.settings_list()}
    if theirs != {s.key for s in settings}:
        raise UserError(f"{args.out} was made for other settings than {args.settings}; pass another --out")
    return rows


def print_plan(steps: list[Step], contexts: dict[str, StudyContext], rows: RowsFile | None) -> None:
    servers = []
    for step in steps:
        key = server_key(step.setting)
        if not servers or servers[-1] != key:
            servers.append(key)
    n_runs = sum(s.kind is TrialKind.COLOCATED for s in steps)
    n_refs = len(steps) - n_runs
    todo = sum(not _done(rows, s) for s in steps)
    print(f"plan: {len(steps)} trials ({n_runs} runs, {n_refs} references) on {len(servers)} server "
          f"configuration(s), {len(servers)} server start(s); {todo} to run", flush=True)
    current = None
    for i, step in enumerate(steps, 1):
        key = server_key(step.setting)
        if key != current:
            current = key
            print(f"server: {describe_server(key)}")
        spec = spec_for(step.setting, step.kind, step.run, contexts[step.setting.key])
        what = {TrialKind.COLOCATED: f"run {step.run}", TrialKind.SERVING_ALONE: "serving alone",
                TrialKind.TRAINER_ALONE: "trainer alone"}[step.kind]
        if spec.workload is not None:
            wl = spec.workload
            load = (f"{len(wl)} requests over {wl.duration_s:.1f} s, "
                    f"{sum(r.prompt_len for r in wl.requests)} prompt / {sum(r.output_len for r in wl.requests)} "
                    f"output tokens, workload {workload_digest(wl)}")
        else:
            load = "no serving"
        serves = f" (for {', '.join(step.systems)})" if step.kind is TrialKind.SERVING_ALONE else ""
        done = " [done]" if _done(rows, step) else ""
        print(f"{i:3d}. {what:13s} {spec.label}{serves}: {load}; trial seed {spec.seed}{done}")
        if step.kind is TrialKind.SERVING_ALONE and spec.workload is not None:
            print(f"     workload: {spec.workload.description}")


def _metric_line(result: TrialResult) -> str:
    if result.error is not None:
        return f"crashed: {result.error} ({result.wall_s:.0f} s)"
    m = result.metrics()
    parts = []
    if "ttft_p99_ms" in m:
        parts += [f"P99 TTFT {m['ttft_p99_ms']:.1f} ms", f"P99 TPOT {m['tpot_p99_ms']:.2f} ms",
                  f"{int(m['completed'])} done / {int(m['failed'])} failed"]
    if "peft_samples_per_s" in m:
        parts.append(f"PEFT {m['peft_samples_per_s']:.3f} samples/s")
    return ", ".join(parts) + f" ({result.wall_s:.0f} s)"


def _machine(backend) -> str:
    d = backend.describe()
    return (f"{d.get('gpu')} ({d.get('gpu_memory_mib')} MiB) x{d.get('gpus')}, vLLM {d.get('vllm')}, "
            f"torch {d.get('torch')}, MPS {'on' if d.get('mps') else 'off'}, {os.cpu_count()} CPUs ({d.get('cpu')})")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.settings)
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UserError(f"--max-minutes must be positive, got {args.max_minutes:g}")
    contexts = {s.key: study_context(s) for s in settings}
    steps = plan(settings, args.runs, trainer_alone=args.references, contexts=contexts)
    rows = _open_rows(args, settings)
    if args.dry_run:
        print_plan(steps, contexts, rows)
        return 0
    if args.out is None:
        raise UserError("--out is required (or --dry-run)")
    todo = [s for s in steps if not _done(rows, s)]
    print(f"{len(todo)} of {len(steps)} trials to run", flush=True)
    if not todo:
        return 0

    from autotune.backends import make_backend

    t0 = time.monotonic()
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/gpu/fidelity.py", *sys.argv[1:]])
    with make_backend("gpu", runs_dir=args.runs_dir) as backend:
        if rows is None:
            rows = RowsFile.new(settings, backend.hardware, _machine(backend), command)
        elif rows.hardware != backend.hardware:
            raise UserError(f"{args.out} was measured on {rows.hardware}, this machine is {backend.hardware}")
        else:
            rows.command += f" ; {command}"
        rows.save(args.out)
        for i, step in enumerate(todo, 1):
            elapsed_min = (time.monotonic() - t0) / 60
            if args.max_minutes is not None and elapsed_min > args.max_minutes:
                print(f"stopped after {elapsed_min:.1f} min (--max-minutes {args.max_minutes:g}): "
                      f"{len(todo) - i + 1} trials not started; --resume continues", flush=True)
                break
            ctx = contexts[step.setting.key]
            spec = spec_for(step.setting, step.kind, step.run, ctx)
            result = backend.run_trial(spec)
            if step.kind is TrialKind.COLOCATED:
                rows.add_run(step.setting, run_record(step.run, result))
            else:
                digest = workload_digest(ctx.workload) if step.kind is TrialKind.SERVING_ALONE else None
                rows.references.append(reference_record(step, result, digest))
            rows.save(args.out)
            print(f"[{i}/{len(todo)}] {spec.label}: {_metric_line(result)}", flush=True)
    print(f"wrote {args.out} ({(time.monotonic() - t0) / 60:.1f} min)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"fidelity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fidelity: interrupted; the rows file keeps every finished trial", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
