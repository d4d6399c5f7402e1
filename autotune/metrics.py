"""From per-request records to serving metrics, as vLLM's benchmark computes
them; and from trainer iterations to PEFT throughput.

TTFT = first token time - send time. TPOT = (latency - TTFT) / (output tokens
- 1), requests with one output token left out. ITL = gaps between consecutive
tokens, pooled over requests. Percentiles are numpy's (linear interpolation),
over requests (over gaps for ITL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from autotune.policy import SAMPLE_TOKENS


@dataclass(frozen=True)
class RequestRecord:
    """What the load generator saw of one request. Times in s, one clock."""

    prompt_len: int  # tokens
    output_len: int  # tokens asked for
    send_s: float
    token_times_s: tuple[float, ...] = ()  # arrival of each output token, first token first
    error: str | None = None
    adapter: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.token_times_s) > 0

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.send_s

    @property
    def latency_s(self) -> float:
        return self.token_times_s[-1] - self.send_s


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, values_s: Sequence[float] | np.ndarray) -> LatencyStats:
        """Stats of values in seconds; all zero for none (as vLLM reports)."""
        v = np.asarray(values_s, dtype=np.float64) * 1000.0
        if v.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0)
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return cls(float(v.mean()), float(p50), float(p90), float(p99))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        return cls(**{f.name: float(d[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class ServingMetrics:
    completed: int
    failed: int
    duration_s: float  # first send to last token
    request_throughput_req_s: float
    output_throughput_tok_s: float
    total_input_tokens: int | None  # None: a record stored before it was kept
    total_output_tokens: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats

    LATENCIES = ("ttft", "tpot", "itl", "e2el")

    def to_dict(self) -> dict[str, Any]:
        """Nested: the counts and rates, then one latency summary per metric."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.LATENCIES},
                **{name: getattr(self, name).to_dict() for name in self.LATENCIES}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServingMetrics:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name not in cls.LATENCIES},
                   **{name: LatencyStats.from_dict(d[name]) for name in cls.LATENCIES})

    @classmethod
    def from_flat(cls, d: Mapping[str, Any]) -> ServingMetrics:
        """From ``flat()``'s names, as studies stored them before metrics were
        nested: the token totals were not kept then (output tokens follow from
        the output throughput; input tokens are None)."""
        duration_s = float(d.get("serving_duration_s", 0.0))
        return cls(
            completed=int(d["completed"]), failed=int(d["failed"]), duration_s=duration_s,
            request_throughput_req_s=float(d["request_throughput_req_s"]),
            output_throughput_tok_s=float(d["output_throughput_tok_s"]),
            total_input_tokens=None,
            total_output_tokens=round(float(d["output_throughput_tok_s"]) * duration_s),
            **{name: LatencyStats(*(float(d[f"{name}_{stat}_ms"]) for stat in ("mean", "p50", "p90", "p99")))
               for name in cls.LATENCIES},
        )

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {
            "completed": self.completed,
            "failed": self.failed,
            "serving_duration_s": self.duration_s,
            "request_throughput_req_s": self.request_throughput_req_s,
            "output_throughput_tok_s": self.output_throughput_tok_s,
        }
        for name in self.LATENCIES:
            for stat, value in asdict(getattr(self, name)).items():
                out[f"{name}_{stat.removesuffix('_ms')}_ms"] = value
        return out


def serving_metrics(records: Sequence[RequestRecord], duration_s: float | None = None) -> ServingMetrics:
    """Aggregate metrics of one run. ``duration_s`` defaults to first send to last token."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in ok]
    tpots = [(r.latency_s - r.ttft_s) / (len(r.token_times_s) - 1) for r in ok if len(r.token_times_s) > 1]
    itls = [g for r in ok for g in np.diff(r.token_times_s)]
    e2els = [r.latency_s for r in ok]
    if duration_s is None:
        start = min((r.send_s for r in records), default=0.0)
        end = max((r.token_times_s[-1] for r in ok), default=start)
        duration_s = end - start
    out_tokens = sum(len(r.token_times_s) for r in ok)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return ServingMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        request_throughput_req_s=rate(len(ok)),
        output_throughput_tok_s=rate(out_tokens),
        total_input_tokens=sum(r.prompt_len for r in ok),
        total_output_tokens=out_tokens,
        ttft=LatencyStats.of(ttfts),
        tpot=LatencyStats.of(tpots),
        itl=LatencyStats.of(itls),
        e2el=LatencyStats.of(e2els),
    )


def goodput_req_s(records: Sequence[RequestRecord], duration_s: float,
                  ttft_limit_ms: float | None, tpot_limit_ms: float | None) -> float:
    """Requests per second that met every given per-request limit (vLLM's goodput)."""
    good = 0
    for r in records:
        if not r.ok:
            continue
        if ttft_limit_ms is not None and r.ttft_s * 1000.0 > ttft_limit_ms:
            continue
        n = len(r.token_times_s)
        if tpot_limit_ms is not None and n > 1 and (r.latency_s - r.ttft_s) / (n - 1) * 1000.0 > tpot_limit_ms:
            continue
        good += 1
    return good / duration_s if duration_s > 0 else 0.0


@dataclass(frozen=True)
class TrainerIteration:
    """One training step of the trainer. Times in s, the trial's clock."""

    start_s: float
    end_s: float
    tokens: int  # tokens trained in this step (batch x sequence length)


@dataclass(frozen=True)
class PeftMetrics:
    peft_samples_per_s: float  # samples of SAMPLE_TOKENS tokens per second
    peft_tokens_per_s: float
    iterations: float  # iterations inside the window (pro rata at its edges)
    window_s: float

    def flat(self) -> dict[str, float]:
        return {
            "peft_samples_per_s": self.peft_samples_per_s,
            "peft_tokens_per_s": self.peft_tokens_per_s,
            "peft_iterations": self.iterations,
            "peft_window_s": self.window_s,
        }

    def to_dict(self) -> dict[str, float]:
        return {"samples_per_s": self.peft_samples_per_s, "tokens_per_s": self.peft_tokens_per_s,
                "iterations": self.iterations, "window_s": self.window_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeftMetrics:
        return cls(float(d["samples_per_s"]), float(d["tokens_per_s"]), float(d["iterations"]), float(d["window_s"]))

    @classmethod
    def from_flat(cls, d: Mapping[str, Any]) -> PeftMetrics:
        return cls(float(d["peft_samples_per_s"]), float(d.get("peft_tokens_per_s", 0.0)),
                   float(d.get("peft_iterations", 0.0)), float(d.get("peft_window_s", 0.0)))


def peft_metrics(iterations: Iterable[TrainerIteration], window_start_s: float, window_end_s: float) -> PeftMetrics:
    """Throughput over [window_start_s, window_end_s]: each iteration counts
    with the fraction of its duration inside the window (duration-weighted),
    so warm-up before the window is excluded."""
    window_s = window_end_s - window_start_s
    assert window_s > 0, f"empty measurement window {window_start_s}..{window_end_s}"
    tokens = 0.0
    count = 0.0
    for it in iterations:
        length = it.end_s - it.start_s
        overlap = min(it.end_s, window_end_s) - max(it.start_s, window_start_s)
        if length <= 0 or overlap <= 0:
            continue
        frac = overlap / length
        tokens += it.tokens * frac
        count += frac
    tokens_per_s = tokens / window_s
    return PeftMetrics(
        peft_samples_per_s=tokens_per_s / SAMPLE_TOKENS,
        peft_tokens_per_s=tokens_per_s,
        iterations=count,
        window_s=window_s,
    )


#: Names ``ServingMetrics.flat()`` and ``PeftMetrics.flat()`` write (a flat record holds serving metrics if it has
#: the first, PEFT metrics if it has the second), and the trial's wall time.
_FLAT_SERVING_KEY, _FLAT_PEFT_KEY, _FLAT_WALL_KEY = "ttft_p99_ms", "peft_samples_per_s", "trial_wall_s"


@dataclass(frozen=True)
class TrialMetrics:
    """Everything a run measured, as a study stores it and ``--json`` writes
    it: serving (counts, rates, a latency summary per metric), PEFT, the run's
    wall time, and the backend's own figures apart (the simulator's event
    count, the GPU backend's phase times). ``flat()`` is the same, one level,
    under the names the fits and tables look metrics up by (``ttft_p99_ms``,
    ``peft_samples_per_s``)."""

    serving: ServingMetrics | None = None
    peft: PeftMetrics | None = None
    wall_s: float = 0.0
    backend: Mapping[str, float] = field(default_factory=dict)

    @property
    def ttft_p99_ms(self) -> float | None:
        return None if self.serving is None else self.serving.ttft.p99_ms

    @property
    def tpot_p99_ms(self) -> float | None:
        return None if self.serving is None else self.serving.tpot.p99_ms

    @property
    def peft_samples_per_s(self) -> float | None:
        return None if self.peft is None else self.peft.peft_samples_per_s

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.serving is not None:
            out.update(self.serving.flat())
        if self.peft is not None:
            out.update(self.peft.flat())
        out[_FLAT_WALL_KEY] = self.wall_s
        out.update(self.backend)
        return out

    def value(self, name: str) -> float | None:
        """One metric by its flat name; None where the run did not measure it."""
        return self.flat().get(name)

    def to_dict(self) -> dict[str, Any]:
        return {"serving": None if self.serving is None else self.serving.to_dict(),
                "peft": None if self.peft is None else self.peft.to_dict(),
                "wall_s": self.wall_s, "backend": dict(self.backend)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialMetrics:
        """A stored record: nested (``to_dict()``), or flat as studies stored
        metrics before they were nested."""
        if not d:
            return cls()
        if "wall_s" in d and "backend" in d:
            return cls(serving=None if d.get("serving") is None else ServingMetrics.from_dict(d["serving"]),
                       peft=None if d.get("peft") is None else PeftMetrics.from_dict(d["peft"]),
                       wall_s=float(d["wall_s"]), backend={k: float(v) for k, v in d["backend"].items()})
        serving = ServingMetrics.from_flat(d) if _FLAT_SERVING_KEY in d else None
        peft = PeftMetrics.from_flat(d) if _FLAT_PEFT_KEY in d else None
        known = {_FLAT_WALL_KEY, *(serving.flat() if serving else {}), *(peft.flat() if peft else {})}
        return cls(serving=serving, peft=peft, wall_s=float(d.get(_FLAT_WALL_KEY, 0.0)),
                   backend={k: float(v) for k, v in d.items() if k not in known and v is not None})
