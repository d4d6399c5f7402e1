"""Fit a profile's host-side numbers to GPU reference runs (none of the held-out rows).

    python -m benchmarks.fidelity.fit_profile --gpu benchmarks/results/fidelity/h200-gpu-rows.json \\
        --base h200-datasheet --trainer-alone-samples-per-s 4.74

Targets: every serving-alone reference of the rows file (P50 TTFT and P50
TPOT: the P99s are what the rows are scored on) and, if given, the trainer's
samples/s alone. Fitted: what ``autotune calibrate`` fits (the API server's
delay, the engine's per-iteration and per-request host costs, one scale on the
trainer's host times; what the targets do not resolve stays, see
``autotune.calibrate.RESOLVED_BY``). Prints the fitted numbers and the residuals;
``--out`` writes the fitted profile (it carries the base's other numbers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from autotune.calibrate import Measured, Measurement, fit_measured, profile_toml  # noqa: E402
from autotune.sim.backend import SimBackend  # noqa: E402
from autotune.sim.fit import Target  # noqa: E402
from autotune.trial import TrialKind  # noqa: E402
from benchmarks.fidelity.rows import RowsFile, spec_for  # noqa: E402

def targets(rows: RowsFile, trainer_alone: float | None) -> list[Target]:
    out = []
    settings = rows.settings_list()
    for ref in rows.references:
        if ref.get("kind") != "serving_alone" or ref.get("error"):
            continue
        setting = next(s for s in settings if s.system == ref["system"] and s.figure == ref["figure"]
                       and s.rate_req_s == ref["rate_req_s"])
        spec = spec_for(setting, TrialKind.SERVING_ALONE, 0)
        name = f"serving alone {ref['system']} {ref['figure']} {ref['rate_req_s']:g} req/s"
        out += [Target(name, spec, "ttft_p50_ms", ref["ttft_p50_ms"]),
                Target(name, spec, "tpot_p50_ms", ref["tpot_p50_ms"], weight=2.0)]
    if trainer_alone is not None:
        spec = spec_for(settings[0], TrialKind.TRAINER_ALONE, 0)
        out.append(Target("trainer alone", spec, "peft_samples_per_s", trainer_alone, weight=2.0))
    return out


def measured_of(targets_: list[Target]) -> list[Measured]:
    """The targets as a calibration's measurements (one per run), for the profile file's header."""
    runs: dict[str, list[Target]] = {}
    for t in targets_:
        runs.setdefault(t.name, []).append(t)
    return [Measured(Measurement(name, ts[0].spec, tuple(t.metric for t in ts), tuple(t.weight for t in ts)),
                     {t.metric: t.value for t in ts}) for name, ts in runs.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", type=Path, required=True, help="rows file of benchmarks/gpu/fidelity.py")
    ap.add_argument("--base", default="h200-datasheet", help="profile whose other numbers stay")
    ap.add_argument("--trainer-alone-samples-per-s", type=float, default=None)
    ap.add_argument("--out", type=Path, help="write the fitted profile here (TOML)")
    ap.add_argument("--name", default="h200", help="the written profile's hardware name")
    args = ap.parse_args(argv)
    base = SimBackend(args.base).profile

    rows = RowsFile.load(args.gpu)
    fit_targets = targets(rows, args.trainer_alone_samples_per_s)
    result = fit_measured(base, fit_targets)
    print(f"fitted on {len(result.targets)} measurements; loss {result.loss:.4f}")
    for key, value in result.fields.items():
        print(f"{key} = {value:.4g}")
    for name, r in result.residuals.items():
        print(f"  {name}: {r:+.1%}")
    if args.out is not None:
        machine = {"gpus": 1, "measured_as": rows.machine, "rows": args.gpu.name}
        command = "python -m benchmarks.fidelity.fit_profile " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(profile_toml(args.name, base, result, machine, measured_of(fit_targets), command))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
