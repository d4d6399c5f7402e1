"""Reliability of one study on several workers: what a study keeps when a
worker is killed or the command is stopped, per storage, and the one-line
answers to bad storage input.

Each cell runs the real command, ``autotune llmstation --figure fig8a
--trials 40 --num-prompts 100 --workers W --storage S`` (simulator, default
profile), in a process of its own (``autotune.testing.faults``):

- fault ``none``: nothing happens to it;
- ``sigkill-worker``: once 3 trials are COMPLETE, a worker in the middle of a
  trial is killed with SIGKILL. With one worker the command itself is the
  worker: the same command is then run again for the trials still missing;
- ``sigint`` / ``sigterm``: the command gets Ctrl-C / SIGTERM in the middle
  of a trial (then the study stops there: "lost" counts the trials not run).

Then the study is read: trials COMPLETE, lost (short of 40), duplicated
(COMPLETE re-runs of COMPLETE trials), failed, re-run (failed trials whose
setting was run again to COMPLETE), left RUNNING, repeated settings
(COMPLETE trials with a setting an earlier COMPLETE one had), and failed
trials lacking constraints or reason.

    python benchmarks/reliability.py        # writes benchmarks/results/reliability.md
    AUTOTUNE_TEST_POSTGRES_URL=postgresql://... python benchmarks/reliability.py   # PostgreSQL rows too
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from autotune.storage import open_storage
from autotune.testing.faults import command, run_study_with_fault, tally

RESULTS = Path(__file__).resolve().parent / "results"
POSTGRES_ENV = "AUTOTUNE_TEST_POSTGRES_URL"
TRIALS = 40
PROMPTS = 100
SYSTEM = "llmstation"


def storage_url(kind: str, folder: Path) -> str | None:
    if kind == "sqlite":
        return f"sqlite:///{folder / 'studies.db'}"
    if kind == "journal":
        return str(folder / "studies.log")
    return os.environ.get(POSTGRES_ENV)


def cell(kind: str, workers: int, fault: str, folder: Path) -> dict:
    url = storage_url(kind, folder)
    name = f"reliability-{kind}-w{workers}-{fault}-{uuid.uuid4().hex[:6]}"
    argv = command(SYSTEM, url, name, folder, trials=TRIALS, workers=workers, num_prompts=PROMPTS)
    run = run_study_with_fault(argv, url, name, fault)
    codes = [str(run.exit_code)]
    wall_s = run.wall_s
    if fault == "sigkill-worker" and workers == 1:  # the command was the worker: start it again
        done = tally(url, name, TRIALS).complete
        again = run_study_with_fault(command(SYSTEM, url, name, folder, trials=TRIALS - done, workers=1,
                                             num_prompts=PROMPTS), url, name, "none")
        codes.append(str(again.exit_code))
        wall_s += again.wall_s
    t = tally(url, name, TRIALS)
    if run.hurt_trial is not None:  # how the trial in flight ended: FAIL, or COMPLETE where the signal came as it was stored
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        hurt = f"{run.hurt_trial} ({study.trials[run.hurt_trial].state.name})"
    else:  # no fault, or a SIGKILL that landed between two trials
        hurt = "between trials" if fault == "sigkill-worker" else "-"
    return {"storage": kind, "workers": workers, "fault": fault, "exit": " then ".join(codes),
            "hurt": hurt, "wall_s": wall_s, "tally": t,
            "traceback": "Traceback" in run.stdout + run.stderr}


BAD_INPUTS = [
    ("--workers 0", ["--workers", "0"]),
    ("PostgreSQL server not answering", ["--storage", "postgresql://autotune@127.0.0.1:9/autotune"]),
    ("postgres:// scheme", ["--storage", "postgres://autotune@127.0.0.1/autotune"]),
    ("SQLite storage on a folder", ["--storage", "sqlite:///{folder}"]),
    ("journal in a missing folder", ["--storage", "{folder}/missing/studies.log"]),
    ("--workers 2 on --backend gpu without vLLM or a GPU", ["--workers", "2", "--backend", "gpu"]),
]


def bad_input(args: list[str], folder: Path, env: dict | None = None) -> tuple[int, str]:
    argv = [sys.executable, "-m", "autotune", SYSTEM, "--trials", "2", "--num-prompts", "20",
            "--runs-dir", str(folder / "runs"), *[a.format(folder=folder) for a in args]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return done.returncode, " / ".join(lines) if len(lines) <= 2 else f"{len(lines)} lines: {lines[-1]}"


def no_driver_env(folder: Path) -> dict:
    """An interpreter on which neither PostgreSQL driver can be imported, as
    where the ``postgres`` extra is not installed."""
    blocked = folder / "no-drivers"
    blocked.mkdir(exist_ok=True)
    for module in ("psycopg", "psycopg2"):
        (blocked / f"{module}.py").write_text(f'raise ImportError("No module named {module}")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")]))}


def markdown(cells: list[dict], bad: list[tuple[str, int, str]], skipped: list[str], total_s: float) -> str:
    lines = [
        "# Reliability: one study, several workers",
        "",
        f"`python benchmarks/reliability.py` on {platform.machine()} ({os.cpu_count()} cores), "
        f"Python {platform.python_version()}, Optuna {optuna.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"{total_s:.0f} s in all.",
        f"Each row: `autotune {SYSTEM} --figure fig8a --trials {TRIALS} --num-prompts {PROMPTS} "
        "--workers W --storage S` on the simulator, hurt as the fault says (see the script's docstring).",
        "",
        "| storage | workers | fault | exit | hurt trial | COMPLETE | lost | duplicated | failed | re-run "
        "| left RUNNING | repeated settings | failed w/o constraints or reason | traceback | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        t = c["tally"]
        lines.append(f"| {c['storage']} | {c['workers']} | {c['fault']} | {c['exit']} | "
                     f"{c['hurt']} | {t.complete} | {t.lost} | {t.duplicated} | "
                     f"{t.failed} | {t.rerun} | {t.running} | {t.repeated_settings} | "
                     f"{t.failed_without_constraints} | {'yes' if c['traceback'] else 'no'} | {c['wall_s']:.1f} |")
    lines += ["", "\"hurt trial\": the trial in flight when the fault struck, and how it ended (on the "
              "simulator a trial takes well under a second, so the signal sometimes comes as it is being stored: "
              "then it is stored whole, COMPLETE). \"lost\" after Ctrl-C or SIGTERM is the trials not run because "
              "the command was stopped; the study keeps the rest, and the same command goes on with it.", ""]
    if skipped:
        lines += [f"Not run: {'; '.join(skipped)}.", ""]
    lines += ["## Bad input", "", "| input | exit | what it says |", "|---|---|---|"]
    for what, code, text in bad:
        lines.append(f"| {what} | {code} | `{text}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability.md")
    args = parser.parse_args()
    t0 = time.monotonic()
    kinds = ["sqlite", "journal"] + (["postgresql"] if os.environ.get(POSTGRES_ENV) else [])
    skipped = [] if os.environ.get(POSTGRES_ENV) else [f"PostgreSQL ({POSTGRES_ENV} not set)"]
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for workers, fault in [(1, "none"), (3, "none"), (1, "sigkill-worker"), (3, "sigkill-worker"),
                                   (1, "sigint"), (3, "sigint"), (1, "sigterm"), (3, "sigterm")]:
                folder = Path(tmp) / f"{kind}-{workers}-{fault}"
                folder.mkdir()
                cells.append(cell(kind, workers, fault, folder))
                print(cells[-1]["storage"], workers, fault, cells[-1]["exit"], cells[-1]["tally"], flush=True)
        bad = []
        for what, extra in BAD_INPUTS:
            folder = Path(tmp) / f"bad-{len(bad)}"
            folder.mkdir()
            bad.append((what, *bad_input(extra, folder)))
        folder = Path(tmp) / "no-driver"
        folder.mkdir()
        bad.append(("plain postgresql:// without a driver installed",
                    *bad_input(["--storage", "postgresql://autotune@127.0.0.1/autotune"], folder,
                               env=no_driver_env(folder))))
    args.out.write_text(markdown(cells, bad, skipped, time.monotonic() - t0), encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
