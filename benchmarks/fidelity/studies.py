"""Rows files from studies run on the GPU (``autotune SYSTEM --backend gpu --json FILE``).

    python -m benchmarks.fidelity.studies --out-dir benchmarks/results/fidelity/h100-gpu-rows \\
        benchmarks/results/gpu-h100/llmstation.json benchmarks/results/gpu-h100/smoke-llama-3.2-1b.json ...

A study's ``--json`` output holds, for one system, figure and rate, its
serving-alone and trainer-alone references and its trials (knobs, P99 TTFT,
P99 TPOT, PEFT samples/s), and its ``--confirm`` runs (a trial's knobs on a
fresh workload, held to the same SLO in ms). Each study becomes one rows file
(``benchmarks/fidelity/rows.py``): one setting and one row per trial, the
trial's figures as its one run (``run`` = the trial's number), the references
as the rows file's references. A confirmation run is a row of its own on the
fresh workload's seed; the study held it to the SLO of its own serving-alone
reference, so that reference serves it too (``slo_for_workload_digests``).

Split (``held_out``): the studies are read in the order given, and each
system's trials (then its confirmation runs) are counted across all of them:
the 1st, 3rd, 5th, ... of a system are fit rows, the 2nd, 4th, ... held out.
The rule looks at nothing but the order, so it is fixed before any error is
seen.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from autotune.errors import UserError  # noqa: E402
from autotune.study import workload_digest  # noqa: E402
from benchmarks.fidelity.rows import (  # noqa: E402
    REFERENCE_METRICS,
    RUN_METRICS,
    RowsFile,
    Setting,
    reference_key,
    server_key,
    study_context,
    write_json_atomic,
)

_WINDOW = re.compile(r"first (\d+(?:\.\d+)?) s\b")


def _study_seconds(study: Mapping[str, Any]) -> float | None:
    """The traffic window of the study (``--trial-seconds``), read from its workload line."""
    found = _WINDOW.search(str(study.get("workload", "")))
    return float(found.group(1)) if found else None


def _run(number: int, metrics: Mapping[str, Any], error: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"run": number, **{m: metrics.get(m) for m in RUN_METRICS}}
    rec["completed"] = int(metrics["completed"]) if "completed" in metrics else None
    rec["failed"] = int(metrics["failed"]) if "failed" in metrics else None
    rec["error"] = error
    rec["wall_s"] = metrics.get("trial_wall_s")
    return rec


def convert(study: Mapping[str, Any], source: str, held_out_of: Any) -> RowsFile:
    """One study's rows file. ``held_out_of(system)``: whether the next trial of that system is held out."""
    system, figure, rate = str(study["system"]), str(study["figure"]), float(study["rate_req_s"])
    seconds = _study_seconds(study)
    info = study.get("backend_info", {})
    mps_on = "on" if info.get("mps") else "off"
    machine = (f"{info.get('gpu', 'unknown GPU')} ({info.get('gpu_memory_mib', '?')} MiB) x1, "
               f"vLLM {info.get('vllm', '?')}, PyTorch {info.get('torch', '?')}, MPS {mps_on}")
    rows = RowsFile(str(info.get("hardware", "unknown")), machine,
                    f"python -m benchmarks.fidelity.studies (from {source}, study {study.get('study_name')})",
                    "", [], [], [])

    def setting(params: Mapping[str, float], seed: int, held_out: bool) -> Setting:
        return Setting.from_dict({"system": system, "figure": figure, "rate_req_s": rate, "params": dict(params),
                                  "num_prompts": None, "trial_seconds": seconds, "model": study["model"],
                                  "seed": seed, "held_out": held_out}, f"{source}: {system}")

    base_seed = 0  # the study's seed: trial n replays the workload of seed 0 (trial_spec's seed + n is the run's)
    first = None
    for trial in study["trials"]:
        if trial.get("state") not in ("COMPLETE", None) and not trial.get("metrics"):
            continue
        s = setting(trial["params"], base_seed, held_out_of(system))
        first = first or s
        rows.settings.append(s.to_dict())
        rows.add_run(s, _run(int(trial["number"]), trial.get("metrics") or {}, trial.get("error")))
    confirm_digests = []
    confirmation = study.get("confirmation") or {}
    by_number = {str(t["number"]): t for t in study["trials"]}
    for number, runs in (confirmation.get("runs") or {}).items():
        for run in runs:
            s = setting(by_number[number]["params"], int(run["workload_seed"]), held_out_of(system))
            rows.settings.append(s.to_dict())
            rows.add_run(s, _run(0, run.get("metrics") or {}, run.get("error")))
            confirm_digests.append(workload_digest(study_context(s).workload))
    if first is None:
        raise UserError(f"{source}: the study has no trial")

    ctx = study_context(first)
    digest = workload_digest(ctx.workload)
    model, gmu, mps = server_key(first)
    for kind, ref in (study.get("reference") or {}).items():
        names = REFERENCE_METRICS if kind == "serving_alone" else ("peft_samples_per_s",)
        rec: dict[str, Any] = {
            "kind": kind,
            "key": reference_key(first, ctx) if kind == "serving_alone" else f"trainer_alone|{model}|{system}",
            "systems": [system], "system": system, "figure": figure, "rate_req_s": rate, "num_prompts": None,
            "trial_seconds": seconds, "model": model, "seed": base_seed, "workload_digest": digest,
            "server": {"gpu_memory_utilization": gmu, "mps": mps},
            **{m: ref.get(m) for m in names},
            "completed": ref.get("completed"), "failed": ref.get("failed"), "error": ref.get("error"),
            "wall_s": ref.get("trial_wall_s"),
        }
        if kind == "serving_alone" and confirm_digests:
            rec["slo_for_workload_digests"] = [digest, *confirm_digests]
        rows.references.append(rec)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.studies", description=__doc__.splitlines()[0])
    ap.add_argument("studies", type=Path, nargs="+", help="study --json outputs, in the order of the split")
    ap.add_argument("--out-dir", type=Path, required=True, help="one <parent>-<study file>.json per study")
    args = ap.parse_args(argv)
    counts: dict[str, int] = {}

    def held_out_of(system: str) -> bool:
        counts[system] = counts.get(system, 0) + 1
        return counts[system] % 2 == 0

    try:
        for path in args.studies:
            try:
                study = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the study {path}: {e}") from None
            rows = convert(study, str(path), held_out_of)
            out = args.out_dir / f"{path.parent.name}-{path.stem}.json"
            write_json_atomic(out, rows.to_dict())
            held = sum(1 for d in rows.settings if d["held_out"])
            print(f"{out}: {len(rows.rows)} rows ({held} held out), {len(rows.references)} references")
    except UserError as e:
        print(f"studies: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
