"""A calibration's measurements file (``autotune calibrate --refit``) from GPU rows files.

    python -m benchmarks.fidelity.measurements --base h100-80gb --out M.measurements.json ROWS.json ...

What ``autotune calibrate`` would have measured, taken from trials run for
other reasons (studies converted by ``benchmarks.fidelity.studies``):

- serving alone: the serving-alone references on the calibration system's
  server (``autotune.calibrate.CALIBRATION_SYSTEM``: its memory share and MPS),
  at one rate and traffic window; the median of their P50 TTFT and P50 TPOT;
- the trainer alone: the median of every trainer-alone reference of the model;
- co-located: every row of the model that is not held out, as a trial of its
  own (its knobs, workload, P99 TTFT, P99 TPOT and PEFT samples/s); held-out
  rows are left out, so they stay out of the fit, and so are rows of another
  model: the refit fits the serving and trainer costs of this model only, so
  another model's misses there would be taken up by the contention terms.

The file says where each number came from (``source``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from autotune.calibrate import CALIBRATION_SYSTEM  # noqa: E402
from autotune.errors import UserError  # noqa: E402
from benchmarks.fidelity.rows import (  # noqa: E402
    DEFAULT_MODEL,
    RowsFile,
    Setting,
    median_and_spread,
    row_setting,
    server_key,
)


def build(files: Sequence[tuple[Path, RowsFile]], base: str, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    calibration_server = server_key(Setting(CALIBRATION_SYSTEM, "fig8a", 1.0, {}, model=model))
    serving, trainer, colocated, sources = [], [], [], []
    for path, rows in files:
        for ref in rows.references:
            if ref.get("error") or ref.get("model", model) != model:
                continue
            if ref.get("kind") == "trainer_alone" and ref.get("peft_samples_per_s"):
                trainer.append((path.name, float(ref["peft_samples_per_s"])))
            elif (ref.get("kind") == "serving_alone" and ref.get("figure") == "fig8a"
                  and (model, ref["server"]["gpu_memory_utilization"], ref["server"]["mps"]) == calibration_server):
                serving.append((path.name, ref))
        held = {Setting.from_dict(d).key: Setting.from_dict(d).held_out for d in rows.settings}
        for row in rows.rows:
            setting = row_setting(row)
            if held.get(setting.key, True) or setting.model != model:
                continue
            runs = [r for r in row["runs"] if not r.get("error")]
            values = {m: median_and_spread(r.get(m) for r in runs)[0]
                      for m in ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s")}
            if not runs or None in values.values():
                continue
            trial = {k: v for k, v in setting.to_dict().items() if k != "held_out"}
            name = f"co-located {setting.describe()} ({path.name})"
            colocated.append({"name": name, "trial": trial, "values": values, "error": None})
        sources.append(path.name)
    windows = {(float(ref["rate_req_s"]), ref.get("trial_seconds")) for _, ref in serving}
    if len(windows) != 1 or not trainer:
        raise UserError(f"need serving-alone references of {CALIBRATION_SYSTEM}'s server at one rate and window "
                        f"(found {sorted(windows, key=str)}) and a trainer-alone reference ({len(trainer)} found)")
    (rate, seconds), = windows
    ttft = statistics.median(float(ref["ttft_p50_ms"]) for _, ref in serving)
    tpot = statistics.median(float(ref["tpot_p50_ms"]) for _, ref in serving)
    peft = statistics.median(v for _, v in trainer)
    first = files[0][1]
    ttfts = ", ".join(f"{float(r['ttft_p50_ms']):.2f}" for _, r in serving)
    tpots = ", ".join(f"{float(r['tpot_p50_ms']):.3f}" for _, r in serving)
    pefts = ", ".join(f"{v:.3f}" for _, v in trainer)
    source = (
        f"derived by `python -m benchmarks.fidelity.measurements` from the rows files {', '.join(sources)} "
        f"(themselves converted from GPU studies' --json outputs): serving alone = median P50s of the "
        f"{len(serving)} serving-alone references on {CALIBRATION_SYSTEM}'s server at fig8a {rate:g} req/s "
        f"(TTFT {ttfts} ms; TPOT {tpots} ms); trainer alone = median of the "
        f"{len(trainer)} trainer-alone references ({pefts} samples/s); "
        f"co-located = the {len(colocated)} trials of {model} that are not held out")
    return {
        "version": 1, "source": source,
        "machine": {"gpu": first.machine.split(" (")[0], "gpus": 1, "measured_as": first.machine},
        "base": base,
        "plan": {"model": model, "rates_req_s": [rate], "trial_seconds": float(seconds) if seconds else 20.0,
                 "mps_thread_pcts": []},
        "measured": [
            {"name": f"serving alone, fig8a {rate:g} req/s", "values": {"ttft_p50_ms": ttft, "tpot_p50_ms": tpot},
             "error": None},
            {"name": "trainer alone", "values": {"peft_samples_per_s": peft}, "error": None},
            *colocated,
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.measurements",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, nargs="+", help="rows files (benchmarks.fidelity.studies, gpu/fidelity.py)")
    ap.add_argument("--base", required=True, help="the profile the refit starts from")
    ap.add_argument("--out", type=Path, required=True, help="NAME.measurements.json")
    args = ap.parse_args(argv)
    try:
        data = build([(p, RowsFile.load(p)) for p in args.rows], args.base)
    except UserError as e:
        print(f"measurements: error: {e}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(data['measured'])} measurements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
