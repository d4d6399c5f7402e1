"""Short studies on the GPU backend, several systems through one backend (so
a server is kept between systems whose server flags agree).

    python benchmarks/gpu/studies.py --systems vllm-torchtune chunked --rate 16 --trials 3 \
        --trial-seconds 30 --out DIR

Writes DIR/<system>.json (the ``--json`` results) and prints one line per trial.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from autotune.backends import make_backend
from autotune.live import PlainReporter
from autotune.results import StudyResult, summary_text, write_json
from autotune.study import StudyConfig, run_study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", nargs="+", required=True)
    ap.add_argument("--figure", default="fig8a")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--trial-seconds", type=float, default=30.0)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    timings = {}
    with make_backend("gpu", runs_dir=runs) as backend:
        for system in args.systems:
            t0 = time.monotonic()
            config = StudyConfig(system=system, figure=args.figure, backend="gpu", rate_req_s=args.rate,
                                 model=args.model, sampler=args.sampler, trial_seconds=args.trial_seconds,
                                 runs_dir=runs)
            ctx = run_study(config, backend, args.trials, PlainReporter())
            result = StudyResult.of(ctx.study)
            write_json(result, args.out / f"{system}.json")
            print(summary_text(result), flush=True)
            timings[system] = {"study_wall_s": time.monotonic() - t0,
                               "server_starts": backend.keeper.starts}
    (args.out / "timings.json").write_text(json.dumps({"command": " ".join(sys.argv), **timings}, indent=2))


if __name__ == "__main__":
    main()
