"""Metrics against hand-computed cases (numpy percentiles: linear interpolation)."""

import json
from dataclasses import replace

import pytest

from autotune.metrics import (
    LatencyStats,
    RequestRecord,
    TrainerIteration,
    TrialMetrics,
    goodput_req_s,
    peft_metrics,
    serving_metrics,
)
from autotune.policy import SAMPLE_TOKENS

# send s, token times s -> TTFT, latency (E2EL), TPOT, ITL by hand
A = RequestRecord(100, 3, 0.0, (0.1, 0.3, 0.6))  # TTFT 100 ms, E2EL 600, TPOT 250, ITL 200 300
B = RequestRecord(200, 2, 1.0, (1.4, 1.5))  # TTFT 400, E2EL 500, TPOT 100, ITL 100
C = RequestRecord(300, 1, 2.0, (2.2,))  # TTFT 200, E2EL 200; one token: no TPOT, no ITL
D = RequestRecord(400, 5, 0.5, (), error="timeout")  # failed, no tokens
E = RequestRecord(500, 5, 3.0, (3.1,), error="HTTP 500")  # failed after a token
RECORDS = [A, B, C, D, E]


def _stats(m: LatencyStats) -> list[float]:
    return [m.mean_ms, m.p50_ms, m.p90_ms, m.p99_ms]


def test_latency_stats_by_hand():
    m = serving_metrics(RECORDS)
    # TTFT [100, 200, 400]: p90 at rank 1.8 -> 200 + 0.8*200
    assert _stats(m.ttft) == pytest.approx([700 / 3, 200, 360, 396])
    # TPOT [100, 250]: C (one token) left out
    assert _stats(m.tpot) == pytest.approx([175, 175, 235, 248.5])
    # ITL pooled gaps [100, 200, 300]
    assert _stats(m.itl) == pytest.approx([200, 200, 280, 298])
    # E2EL [200, 500, 600]
    assert _stats(m.e2el) == pytest.approx([1300 / 3, 500, 580, 598])


def test_counts_and_default_duration():
    m = serving_metrics(RECORDS)
    assert (m.completed, m.failed) == (3, 2)
    assert m.duration_s == pytest.approx(2.2)  # first send (0) to last token of a completed request
    assert m.total_input_tokens == 600
    assert m.total_output_tokens == 6
    assert m.request_throughput_req_s == pytest.approx(3 / 2.2)
    assert m.output_throughput_tok_s == pytest.approx(6 / 2.2)


def test_throughput_over_given_duration():
    m = serving_metrics(RECORDS, duration_s=10.0)
    assert m.duration_s == 10.0
    assert m.request_throughput_req_s == pytest.approx(0.3)
    assert m.output_throughput_tok_s == pytest.approx(0.6)


def test_empty_input_is_zeros():
    m = serving_metrics([])
    assert (m.completed, m.failed, m.duration_s) == (0, 0, 0.0)
    assert m.request_throughput_req_s == 0.0 and m.output_throughput_tok_s == 0.0
    for stats in (m.ttft, m.tpot, m.itl, m.e2el):
        assert _stats(stats) == [0.0] * 4


def test_all_failed():
    m = serving_metrics([D, E])
    assert (m.completed, m.failed) == (0, 2)
    assert m.request_throughput_req_s == 0.0
    assert _stats(m.ttft) == [0.0] * 4


def test_flat_keys():
    flat = serving_metrics(RECORDS).flat()
    assert flat["ttft_p99_ms"] == pytest.approx(396)
    assert flat["tpot_mean_ms"] == pytest.approx(175)
    assert flat["itl_p90_ms"] == pytest.approx(280)
    assert flat["e2el_p50_ms"] == pytest.approx(500)
    assert flat["failed"] == 2


@pytest.mark.parametrize("ttft_ms, tpot_ms, good", [
    (None, None, 3),  # every completed request
    (250, None, 2),  # A, C (B's TTFT is 400)
    (None, 200, 2),  # B, C (A's TPOT is 250; C has none, so meets it)
    (250, 200, 1),  # C only
    (50, 50, 0),
])
def test_goodput(ttft_ms, tpot_ms, good):
    assert goodput_req_s(RECORDS, 10.0, ttft_ms, tpot_ms) == pytest.approx(good / 10.0)


def test_goodput_zero_duration():
    assert goodput_req_s(RECORDS, 0.0, None, None) == 0.0


def test_peft_duration_weighted_window():
    its = [
        TrainerIteration(0.0, 2.0, 512),  # warm-up, before the window: excluded
        TrainerIteration(2.0, 4.0, 512),  # half inside: 256 tokens, 0.5 iteration
        TrainerIteration(4.0, 6.0, 1024),  # inside: 1024 tokens
        TrainerIteration(6.0, 10.0, 2048),  # a quarter inside: 512 tokens
        TrainerIteration(11.0, 12.0, 512),  # after the window
    ]
    p = peft_metrics(its, 3.0, 7.0)
    assert p.window_s == 4.0
    assert p.iterations == pytest.approx(1.75)
    assert p.peft_tokens_per_s == pytest.approx(1792 / 4)
    assert p.peft_samples_per_s == pytest.approx(1792 / 4 / SAMPLE_TOKENS)
    assert SAMPLE_TOKENS == 512
    assert p.flat()["peft_samples_per_s"] == pytest.approx(0.875)


def test_peft_iteration_spanning_the_window_and_none():
    p = peft_metrics([TrainerIteration(0.0, 10.0, 1000)], 2.0, 4.0)  # 20% inside
    assert p.peft_tokens_per_s == pytest.approx(200 / 2)
    assert p.iterations == pytest.approx(0.2)
    assert peft_metrics([], 0.0, 5.0).peft_samples_per_s == 0.0


# ---------------------------------------------------------------- a trial's metrics, as stored


def _trial_metrics() -> TrialMetrics:
    peft = peft_metrics([TrainerIteration(0.0, 1.0, SAMPLE_TOKENS * 2)], 0.0, 1.0)
    return TrialMetrics(serving=serving_metrics(RECORDS), peft=peft, wall_s=3.5, backend={"sim_events": 1234.0})


def test_trial_metrics_are_nested_and_read_back_whole():
    m = _trial_metrics()
    d = m.to_dict()
    assert set(d) == {"serving", "peft", "wall_s", "backend"}
    assert d["serving"]["ttft"] == {"mean_ms": pytest.approx(700 / 3), "p50_ms": pytest.approx(200),
                                    "p90_ms": pytest.approx(360), "p99_ms": pytest.approx(396)}
    assert d["serving"]["failed"] == 2 and d["serving"]["total_input_tokens"] == 600
    assert d["peft"] == {"samples_per_s": 2.0, "tokens_per_s": 2.0 * SAMPLE_TOKENS, "iterations": 1.0,
                         "window_s": 1.0}
    assert d["backend"] == {"sim_events": 1234.0}  # apart from serving and PEFT
    assert TrialMetrics.from_dict(json.loads(json.dumps(d))) == m
    assert (m.ttft_p99_ms, m.tpot_p99_ms, m.peft_samples_per_s) == (pytest.approx(396), pytest.approx(248.5), 2.0)  # TPOT [100, 250]


def test_flat_is_the_nested_record_under_the_lookup_names():
    m = _trial_metrics()
    flat = m.flat()
    assert flat["ttft_p99_ms"] == m.ttft_p99_ms and flat["peft_samples_per_s"] == 2.0
    assert flat["trial_wall_s"] == 3.5 and flat["sim_events"] == 1234.0
    assert m.value("tpot_p50_ms") == m.serving.tpot.p50_ms and m.value("no_such_metric") is None


def test_a_flat_record_of_an_earlier_version_reads_as_the_same_metrics():
    """Studies stored metrics flat before they were nested: they still load,
    the same numbers in the same places (the input-token total was not kept)."""
    m = _trial_metrics()
    old = TrialMetrics.from_dict(json.loads(json.dumps(m.flat())))
    assert old.serving == replace(m.serving, total_input_tokens=None)
    assert old.peft == m.peft and old.wall_s == 3.5 and dict(old.backend) == {"sim_events": 1234.0}
    trainer_alone = TrialMetrics.from_dict({"peft_samples_per_s": 3.0, "peft_tokens_per_s": 1536.0,
                                            "peft_iterations": 10.0, "peft_window_s": 5.0, "trial_wall_s": 6.0})
    assert trainer_alone.serving is None and trainer_alone.peft_samples_per_s == 3.0
    assert TrialMetrics.from_dict({}) == TrialMetrics()  # a trial that stored none (crashed before measuring)
