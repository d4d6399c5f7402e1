"""The simulator beside the GPU, in numbers: relative errors, SLO verdicts,
and whether a knob moves both the same way. Pure functions on plain data, so
that they are tested on hand-made numbers.

Error = sim / gpu - 1. Where the GPU value is 0 or missing (a crashed run, a
metric the trial has not got) the error is None, shown as n/a, and left out
of every median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The metrics compared, in table order.
METRICS = ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s")
METRIC_TITLES = {"ttft_p99_ms": "P99 TTFT", "tpot_p99_ms": "P99 TPOT", "peft_samples_per_s": "PEFT"}
#: Largest acceptable median |sim / gpu - 1| per metric.
ERROR_TARGETS = {"ttft_p99_ms": 0.20, "tpot_p99_ms": 0.10, "peft_samples_per_s": 0.10}
#: Smallest acceptable share of settings where sim and GPU agree on meeting the SLO.
VERDICT_TARGET = 0.90


def _value(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def relative_error(sim: float | None, gpu: float | None) -> float | None:
    """sim / gpu - 1; None where either is missing or the GPU value is 0."""
    s, g = _value(sim), _value(gpu)
    if s is None or g is None or g == 0:
        return None
    return s / g - 1.0


def median_abs_error(errors: Iterable[float | None]) -> float | None:
    """Median of |error| over the errors that exist; None if none does."""
    v = [abs(e) for e in (_value(x) for x in errors) if e is not None]
    return statistics.median(v) if v else None


def meets_slo(ttft_p99_ms: float | None, tpot_p99_ms: float | None, slo_ttft_p99_ms: float | None,
              slo_tpot_p99_ms: float | None, failed: float | None = 0) -> bool | None:
    """Both P99s within their limits and no request failed (as the study's
    constraints say); None where a figure or a limit is missing."""
    values = [_value(x) for x in (ttft_p99_ms, tpot_p99_ms, slo_ttft_p99_ms, slo_tpot_p99_ms)]
    if any(v is None for v in values):
        return None
    ttft, tpot, slo_ttft, slo_tpot = values
    if failed:
        return False
    return ttft <= slo_ttft and tpot <= slo_tpot


def verdict_agreement(pairs: Iterable[tuple[bool | None, bool | None]]) -> tuple[int, int]:
    """(settings where GPU and sim verdicts agree, settings with both verdicts)."""
    both = [(g, s) for g, s in pairs if g is not None and s is not None]
    return sum(g == s for g, s in both), len(both)


def sign(x: float | None) -> int | None:
    if x is None:
        return None
    return (x > 0) - (x < 0)


def signs_agree(gpu_delta: float | None, sim_delta: float | None) -> bool | None:
    a, b = sign(gpu_delta), sign(sim_delta)
    if a is None or b is None:
        return None
    return a == b


def _change(low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """(high - low, high / low - 1 or None)."""
    lo, hi = _value(low), _value(high)
    if lo is None or hi is None:
        return None, None
    return hi - lo, (hi / lo - 1.0 if lo != 0 else None)


def _disjoint(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Whether two [min, max] ranges do not overlap (the change is more than run-to-run spread)."""
    if not a or not b or any(_value(x) is None for x in (*a, *b)):
        return None
    return a[1] < b[0] or b[1] < a[0]


def knob_moves(rows: Sequence[Mapping[str, Any]],
               knob_order: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """For each (system, figure, rate) with two or more settings: from the
    setting with the lowest to the one with the highest value of the knob
    that differs (the first in the system's knob order when several do), the
    change of each metric on the GPU and in the simulator, and whether the
    signs agree. ``gpu_resolved``: the GPU runs' [min, max] of the two
    settings do not overlap, so the GPU's direction is more than run-to-run
    spread.

    A row: {"system", "figure", "rate_req_s", "params", "gpu": {metric: value},
    "sim": {metric: value}, optional "gpu_spread": {metric: [min, max]}}.
    """
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["figure"], float(row["rate_req_s"])), []).append(row)
    out: list[dict[str, Any]] = []
    for (system, figure, rate), group in groups.items():
        if len(group) < 2:
            continue
        order = list((knob_order or {}).get(system) or group[0]["params"].keys())
        differing = [k for k in order if len({float(r["params"][k]) for r in group}) > 1]
        if not differing:
            continue
        knob = differing[0]
        ranked = sorted(group, key=lambda r: float(r["params"][knob]))  # stable: ties keep file order
        low, high = ranked[0], ranked[-1]
        metrics: dict[str, dict[str, Any]] = {}
        for m in METRICS:
            gpu_delta, gpu_change = _change(low["gpu"].get(m), high["gpu"].get(m))
            sim_delta, sim_change = _change(low["sim"].get(m), high["sim"].get(m))
            spread_low = (low.get("gpu_spread") or {}).get(m)
            spread_high = (high.get("gpu_spread") or {}).get(m)
            metrics[m] = {"gpu_delta": gpu_delta, "sim_delta": sim_delta, "gpu_change": gpu_change,
                          "sim_change": sim_change, "agree": signs_agree(gpu_delta, sim_delta),
                          "gpu_resolved": _disjoint(spread_low, spread_high)}
        out.append({"system": system, "figure": figure, "rate_req_s": rate, "knob": knob,
                    "low": low["params"][knob], "high": high["params"][knob],
                    "also_changed": differing[1:], "settings": len(group),
                    "low_params": dict(low["params"]), "high_params": dict(high["params"]), "metrics": metrics})
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median |error| per metric, verdict agreement, and each target met or not
    (None where nothing could be counted). A row: {"error": {metric: e or None},
    "verdict": {"gpu": bool or None, "sim": bool or None}}."""
    errors = {m: [r["error"].get(m) for r in rows] for m in METRICS}
    median = {m: median_abs_error(errors[m]) for m in METRICS}
    counted = {m: sum(_value(e) is not None for e in errors[m]) for m in METRICS}
    agree, total = verdict_agreement((r["verdict"]["gpu"], r["verdict"]["sim"]) for r in rows)
    share = agree / total if total else None
    targets: dict[str, dict[str, Any]] = {
        m: {"target": ERROR_TARGETS[m], "value": median[m],
            "met": None if median[m] is None else median[m] <= ERROR_TARGETS[m]}
        for m in METRICS
    }
    targets["verdict_agreement"] = {"target": VERDICT_TARGET, "value": share,
                                    "met": None if share is None else share >= VERDICT_TARGET}
    return {"settings": len(rows), "median_abs_error": median, "errors_counted": counted,
            "verdicts": {"agree": agree, "total": total, "share": share}, "targets": targets}


def knob_agreement(moves: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per metric: knob moves whose GPU and sim signs agree, of those with both."""
    out = {}
    for m in METRICS:
        both = [mv["metrics"][m]["agree"] for mv in moves if mv["metrics"][m]["agree"] is not None]
        out[m] = {"agree": sum(both), "total": len(both)}
    return out
