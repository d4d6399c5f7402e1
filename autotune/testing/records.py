"""Made-up records for tests of what reads them (tables, figures, results):
a trial's metrics from the few numbers such a test cares about."""

from __future__ import annotations

from autotune.metrics import LatencyStats, PeftMetrics, ServingMetrics, TrialMetrics
from autotune.policy import SAMPLE_TOKENS


def made_up_metrics(peft_samples_per_s: float | None = None, ttft_p99_ms: float | None = None,
                    tpot_p99_ms: float | None = None, wall_s: float = 0.0) -> TrialMetrics:
    """Serving metrics where a P99 is given (every other statistic equal to
    it, one request), PEFT metrics where samples/s are."""
    serving = None
    if ttft_p99_ms is not None or tpot_p99_ms is not None:
        def stats(ms: float | None) -> LatencyStats:
            return LatencyStats(*(4 * [ms or 0.0]))
        serving = ServingMetrics(completed=1, failed=0, duration_s=1.0, request_throughput_req_s=1.0,
                                 output_throughput_tok_s=2.0, total_input_tokens=1, total_output_tokens=2,
                                 ttft=stats(ttft_p99_ms), tpot=stats(tpot_p99_ms), itl=stats(tpot_p99_ms),
                                 e2el=stats((ttft_p99_ms or 0.0) + (tpot_p99_ms or 0.0)))
    peft = None
    if peft_samples_per_s is not None:
        peft = PeftMetrics(peft_samples_per_s, peft_samples_per_s * SAMPLE_TOKENS, iterations=1.0, window_s=1.0)
    return TrialMetrics(serving=serving, peft=peft, wall_s=wall_s)
