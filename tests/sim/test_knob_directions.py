"""On every shipped profile each knob moves the simulator in the direction the
GPU table shows.

The directions come from the committed GPU results
(benchmarks/results/fidelity/h200.json, its fig8a rows: one knob move per
system, all from the first sitting): for each (system, figure, rate) with
two settings, low -> high in the first knob (in the system's knob order) that
differs, the sign of the change of the GPU medians of P99 TPOT and of PEFT
samples/s. A metric whose two settings' GPU run ranges (``gpu.spread``,
[min, max] over the runs) overlap is left out: the GPU did not resolve its
direction. The simulator then runs the same two settings on every packaged
profile, at that profile's own rate, and must change the metric the same way.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # ``benchmarks`` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from autotune.figures import get_figure  # noqa: E402
from autotune.sim.backend import SimBackend  # noqa: E402
from autotune.sim.profile import packaged_profiles  # noqa: E402
from autotune.systems import get_system  # noqa: E402
from autotune.trial import TrialKind  # noqa: E402
from benchmarks.fidelity.rows import Setting, spec_for, study_context  # noqa: E402

GPU_RESULTS = REPO / "benchmarks" / "results" / "fidelity" / "h200.json"
METRICS = ("tpot_p99_ms", "peft_samples_per_s")
PROFILES = packaged_profiles()


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def sim_sign(low: float, high: float) -> int:
    """The sign of a simulated change; 0 within floating-point rounding (two runs that
    differ only in the last bits of a sum did not move)."""
    return 0 if abs(high - low) <= 1e-9 * max(abs(low), abs(high)) else sign(high - low)


def knob_moves(doc: dict) -> list[dict]:
    """Each (system, figure, rate) with two settings: its low and high rows and, per
    metric the GPU resolved, the sign of its GPU change low -> high."""
    groups: dict[tuple[str, str, float, str], list[dict]] = {}
    for row in doc["rows"]:
        if row["figure"] != "fig8a":
            continue  # a sitting's rows are compared among themselves (its own host and references)
        groups.setdefault((row["system"], row["figure"], float(row["rate_req_s"]), row["gpu_file"]), []).append(row)
    moves = []
    for (system, figure, rate, _), group in groups.items():
        if len(group) != 2:
            continue
        order = [k.name for k in get_system(system).knobs]
        knob = next(k for k in order if group[0]["params"][k] != group[1]["params"][k])
        low, high = sorted(group, key=lambda r: r["params"][knob])
        directions = {}
        for m in METRICS:
            (lo_min, lo_max), (hi_min, hi_max) = low["gpu"]["spread"][m], high["gpu"]["spread"][m]
            if lo_max < hi_min or hi_max < lo_min:  # the runs' ranges do not overlap: resolved
                directions[m] = sign(high["gpu"][m] - low["gpu"][m])
        moves.append({"system": system, "figure": figure, "rate_req_s": rate, "knob": knob, "low": low,
                      "high": high, "directions": directions})
    return moves


DOC = json.loads(GPU_RESULTS.read_text())
MOVES = {m["system"]: m for m in knob_moves(DOC)}
#: The hardware the GPU rows were simulated as (its fig8a default: the rate of most rows).
GPU_HARDWARE = DOC["simulator"][0]["hardware"]


def sim_setting(move: dict, which: str, profile: str) -> Setting:
    """The GPU row's setting, moved to ``profile``: the row's rate relative to the fig8a
    default of the GPU's hardware, times the profile's own fig8a default. That is the
    profile's default for vLLM+torchtune, chunked prefill and LLMStation (their rows ran at
    the H200's default, 24 req/s); FineInfer's rows ran at a sixth of it (4 req/s), so it
    runs at a sixth of the profile's default here: the GPU's choice carried over, not one
    picked per profile. At the default rate FineInfer, which trains only while no request
    is in flight, hardly trains (one trainer iteration in a 15-s window in the sim); at a
    sixth it trains on every profile.

    The workload has as many requests as the GPU row's (its window of trial_seconds at its
    rate: 350 for fig8a 24 req/s, 62 for FineInfer at 4): a P99 over ~100 requests (a 15-s
    window at 7 req/s) is set by one or two requests, and on 2x-rtx3090 its direction
    changes with the workload seed. Each simulation is well under a second.
    """
    row = move[which]
    gpu_default, _ = get_figure(row["figure"]).default_rate(GPU_HARDWARE)
    profile_default, _ = get_figure(row["figure"]).default_rate(profile)
    gpu_setting = Setting.from_dict({k: row[k] for k in ("system", "figure", "rate_req_s", "params",
                                                         "num_prompts", "trial_seconds")})
    requests = len(study_context(gpu_setting).workload)
    return Setting.from_dict({"system": row["system"], "figure": row["figure"],
                              "rate_req_s": row["rate_req_s"] / gpu_default * profile_default,
                              "params": row["params"], "num_prompts": requests})


@lru_cache(maxsize=None)
def simulate(profile: str, system: str, which: str) -> dict[str, float]:
    setting = sim_setting(MOVES[system], which, profile)
    result = SimBackend(profile).run_trial(spec_for(setting, TrialKind.COLOCATED, 0))
    assert result.error is None, result.error
    return result.metrics()


#: (profile, system, metric) where the simulator does not move the GPU's way, with the numbers.
#: FineInfer at a sixth of the fig8a default: of its 62 requests the deferral gate holds only 4
#: (2x-rtx3090), the engine being busy when the others arrive, and every hold outlasts 0.2 s anyway,
#: waiting for the trainer's iteration in progress (0.38-1.56 s), so the two runs are the same run.
#: In the sim FineInfer never overlaps serving with training: TPOT moves only with the batches a
#: deferral forms. (Since the refit of h100-80gb on its GPU studies, h100-80gb and h200-datasheet move
#: FineInfer's P99 TPOT and PEFT (h100-80gb: 22 -> 21 trainer iterations) and h200-datasheet moves
#: vLLM + torchtune's P99 TPOT (+5.2%) the GPU's way; they were listed here before.)
GPU_FINEINFER = "GPU (H200, 4 req/s) P99 TPOT 5.201 -> 5.135 ms (-1.3%), PEFT 0.510 -> 0.462 samples/s (-9.4%)"
DISAGREES = {
    ("2x-rtx3090", "fineinfer", "tpot_p99_ms"):
        "2x-rtx3090 FineInfer 1 req/s, defer_s 0.005 -> 0.2: sim P99 TPOT 16.2932 -> 16.2932 ms "
        f"(+0.0002%: no change); {GPU_FINEINFER}",
}
#: (Since the fig8a default on 2x-rtx3090 went from 7 to 6 req/s with that refit, its FineInfer PEFT
#: moves the GPU's way, but by -0.01% (0.231561 -> 0.231533 samples/s, 8 iterations both) against the
#: GPU's -9.4%: the sign agrees, the size does not.)

CASES = [
    pytest.param(profile, system, metric, id=f"{profile}-{system}-{metric}",
                 marks=[pytest.mark.xfail(strict=True, reason=DISAGREES[(profile, system, metric)])]
                 if (profile, system, metric) in DISAGREES else [])
    for profile in PROFILES for system, move in MOVES.items() for metric in move["directions"]
]


def test_the_gpu_table_resolves_a_direction_for_every_knob_and_metric():
    # what the cases below stand on: the committed table, read the way its scorer read it
    assert sorted(MOVES) == ["chunked", "fineinfer", "llmstation", "vllm-torchtune"]
    assert {s: m["knob"] for s, m in MOVES.items()} == {"vllm-torchtune": "mps_active_thread_pct",
                                                         "chunked": "chunk_size_tokens",
                                                         "llmstation": "forward_tasklets", "fineinfer": "defer_s"}
    assert {s: m["directions"] for s, m in MOVES.items()} == {
        "vllm-torchtune": {"tpot_p99_ms": 1, "peft_samples_per_s": 1},
        "chunked": {"tpot_p99_ms": 1, "peft_samples_per_s": 1},
        "llmstation": {"tpot_p99_ms": 1, "peft_samples_per_s": 1},
        "fineinfer": {"tpot_p99_ms": -1, "peft_samples_per_s": -1},
    }
    scored = {mv["system"]: mv for mv in DOC["knob_moves"] if mv["figure"] == "fig8a"}
    for system, move in MOVES.items():
        for m in METRICS:
            resolved = m in move["directions"]
            assert scored[system]["metrics"][m]["gpu_resolved"] is resolved, (system, m)
            if resolved:
                assert sign(scored[system]["metrics"][m]["gpu_delta"]) == move["directions"][m], (system, m)
    assert set(PROFILES) == {"2x-rtx3090", "h100-80gb", "h200", "h200-datasheet"}
    assert len(CASES) == 4 * 8


@pytest.mark.parametrize("profile, system, metric", CASES)
def test_knob_moves_the_simulator_the_way_it_moves_the_gpu(profile, system, metric):
    move = MOVES[system]
    low, high = simulate(profile, system, "low")[metric], simulate(profile, system, "high")[metric]
    assert low > 0 and high > 0
    rate = sim_setting(move, "low", profile).rate_req_s
    change = high / low - 1
    assert sim_sign(low, high) == move["directions"][metric], (
        f"{profile} {system} {rate:g} req/s, {move['knob']} {move['low']['params'][move['knob']]:g} -> "
        f"{move['high']['params'][move['knob']]:g}: sim {metric} {low:.6g} -> {high:.6g} ({change:+.3%}), "
        f"GPU {move['low']['gpu'][metric]:.4g} -> {move['high']['gpu'][metric]:.4g}")
