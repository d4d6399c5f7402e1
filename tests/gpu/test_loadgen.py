"""The load generator against a scripted streaming server in vLLM's SSE format."""

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from autotune.gpu.channel import Channel  # noqa: E402
from autotune.gpu.loadgen import prompt_token_ids, replay, tokens_in_chunk  # noqa: E402
from autotune.metrics import serving_metrics  # noqa: E402
from autotune.policy import ArrivalGate, SharingPolicy  # noqa: E402
from autotune.workloads.spec import RequestSpec, Workload  # noqa: E402

TOL_S = 0.015  # client vs server readings of one event (one event loop; a few ms unless the CPU is swamped)


@dataclass
class Seen:
    """What the scripted server saw of one request."""

    body: dict
    received_s: float
    chunk_times_s: list = field(default_factory=list)  # when each chunk was written


def _chunk(model: str, n_tokens: int, total: int | None, finish: bool = False) -> bytes:
    chunk = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": model,
             "choices": [{"index": 0, "text": " t7" * n_tokens, "logprobs": None,
                          "finish_reason": "length" if finish else None, "stop_reason": None}]}
    if total is not None:
        chunk["usage"] = {"prompt_tokens": 4, "completion_tokens": total, "total_tokens": total + 4}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def stream_plan(ttft_s: float, gap_s: float, per_chunk: int = 1, continuous_usage: bool = True,
                chunks_reported: int | None = None):
    """A plan: first chunk after ttft_s, then one chunk every gap_s, per_chunk tokens each."""

    async def plan(request: web.Request, body: dict, seen: Seen) -> web.StreamResponse:
        n = body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            await asyncio.sleep(ttft_s if sent == 0 else gap_s)
            k = min(per_chunk, n - sent)
            sent += k
            await resp.write(_chunk(body["model"], k, sent if continuous_usage else None, finish=sent == n))
            seen.chunk_times_s.append(time.time())
        final = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"], "choices": [],
                 "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": n + 4}}
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    return plan


async def _serve(plan: Callable, workload: Workload, seen: list[Seen], **replay_kw):
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        s = Seen(body, time.time())
        seen.append(s)
        return await plan(request, body, s)

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        return await replay(url, workload, model_name="llama-3.1-8b", vocab_size=32000, seed=3, **replay_kw)
    finally:
        await runner.cleanup()


def run(plan, requests, **kw):
    seen: list[Seen] = []
    wl = Workload(tuple(requests), rate_req_s=10.0, seed=0, synthetic=True, description="test")
    result = asyncio.run(_serve(plan, wl, seen, **kw))
    return result, seen


def test_ttft_tpot_itl_match_the_script():
    reqs = [RequestSpec(0.0, 5, 4), RequestSpec(0.01, 6, 3)]
    result, seen = run(stream_plan(ttft_s=0.03, gap_s=0.01), reqs)
    assert [len(r.token_times_s) for r in result.records] == [4, 3]
    assert all(r.ok for r in result.records)
    # Each token's time is when the server wrote its chunk (up to the loopback's delay).
    for rec, s in zip(result.records, sorted(seen, key=lambda s: s.body["max_tokens"], reverse=True)):
        assert np.allclose(rec.token_times_s, s.chunk_times_s, atol=TOL_S)
        assert rec.send_s <= s.received_s
    m = serving_metrics(result.records)
    # Sleeps never end early, so the script's delays are lower bounds.
    assert 30 <= m.ttft.mean_ms < 30 + 1000 * TOL_S and 10 <= m.tpot.p50_ms < 10 + 1000 * TOL_S / 2
    assert m.itl.mean_ms == pytest.approx(10, abs=1000 * TOL_S / 2)
    assert m.total_output_tokens == 7 and m.total_input_tokens == 11
    assert result.window_start_s <= result.records[0].send_s < result.records[1].send_s <= result.window_end_s


def test_multi_token_chunks_share_the_chunk_time():
    result, seen = run(stream_plan(ttft_s=0.01, gap_s=0.01, per_chunk=3), [RequestSpec(0.0, 4, 7)])
    (rec,) = result.records
    assert len(rec.token_times_s) == 7  # chunks of 3, 3, 1 tokens
    expected = [t for t, k in zip(seen[0].chunk_times_s, (3, 3, 1)) for _ in range(k)]
    assert np.allclose(rec.token_times_s, expected, atol=TOL_S)


def test_without_continuous_usage_one_token_per_chunk_then_final_usage_fills_up():
    result, seen = run(stream_plan(ttft_s=0.01, gap_s=0.01, per_chunk=2, continuous_usage=False),
                       [RequestSpec(0.0, 4, 5)])
    (rec,) = result.records
    # 3 chunks counted one token each; the final usage (5) adds 2 at the last chunk's time.
    assert len(rec.token_times_s) == 5
    assert rec.token_times_s[2] == rec.token_times_s[3] == rec.token_times_s[4]


def test_tokens_in_chunk_rules():
    assert tokens_in_chunk({"choices": [{"text": ""}], "usage": {"completion_tokens": 5}}, counted=2) == 3
    assert tokens_in_chunk({"choices": [{"text": "", "token_ids": [4, 5]}]}, counted=0) == 2
    assert tokens_in_chunk({"choices": [{"text": "x"}]}, counted=9) == 1
    assert tokens_in_chunk({"choices": [], "usage": {"completion_tokens": 5}}, counted=5) == 0


def test_request_body_and_adapter_names():
    reqs = [RequestSpec(0.0, 6, 2, adapter=3), RequestSpec(0.0, 5, 2), RequestSpec(0.0, 4, 2, adapter=0)]
    result, seen = run(stream_plan(0.005, 0.005), reqs)
    bodies = {len(s.body["prompt"]): s.body for s in seen}
    assert bodies[6]["model"] == "adapter-3" and bodies[5]["model"] == "llama-3.1-8b"
    assert bodies[4]["model"] == "adapter-0"
    b = bodies[6]
    assert (b["stream"], b["ignore_eos"], b["max_tokens"]) == (True, True, 2)
    assert b["stream_options"]["include_usage"] is True
    assert all(256 <= t < 32000 - 256 for s in seen for t in s.body["prompt"])
    assert [r.adapter for r in result.records] == [3, None, 0]


def test_prompts_are_seeded():
    a = prompt_token_ids(np.random.default_rng(1), 50, 128256)
    assert a == prompt_token_ids(np.random.default_rng(1), 50, 128256)
    assert a != prompt_token_ids(np.random.default_rng(2), 50, 128256)
    assert len(a) == 50 and min(a) >= 256 and max(a) < 128256 - 256


def test_errors_are_recorded_not_raised():
    async def plan(request, body, seen):
        kind = len(body["prompt"])
        if kind == 1:
            return web.Response(status=500, text="engine\ndead")
        if kind == 2:  # one chunk, then the connection drops
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_chunk(body["model"], 1, 1))
            request.transport.close()
            return resp
        if kind == 3:  # never answers within the client's timeout
            await asyncio.sleep(1.0)
        if kind == 4:
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b'data: {"error": {"message": "bad adapter", "code": 400}}\n\n')
            await resp.write_eof()
            return resp
        return await stream_plan(0.005, 0.005)(request, body, seen)

    reqs = [RequestSpec(0.0, k, 3) for k in (1, 2, 3, 4, 5)]
    channel = Channel.create()
    try:
        result, _ = run(plan, reqs, channel=channel, request_timeout_s=0.3)
        assert channel.requests_in_flight() == 0
    finally:
        channel.close()
        channel.unlink()
    errors = [r.error for r in result.records]
    assert errors[0] == "HTTP 500: engine dead"
    assert errors[1] is not None and len(result.records[1].token_times_s) == 1
    assert errors[2] == "timeout after 0.3 s"
    assert errors[3].startswith("server error:") and "bad adapter" in errors[3]
    assert errors[4] is None
    m = serving_metrics(result.records)
    assert (m.completed, m.failed) == (1, 4)


def test_progress_reports_fractions_finished():
    fractions = []
    run(stream_plan(0.005, 0.005), [RequestSpec(0.0, 4, 2), RequestSpec(0.01, 4, 2)], progress=fractions.append)
    assert fractions == [0.5, 1.0]


FINEINFER = SharingPolicy(mps=False, gpu_memory_utilization=0.75, arrival_gate=ArrivalGate(defer_s=0.04, poll_s=0.005))


def test_gate_holds_an_idle_arrival_defer_s_and_releases_joiners_together():
    # 0 and 0.02 arrive at an idle server: held until 0.04, sent together.
    # 0.05 arrives while they are in flight (answers take 40 ms): sent at once.
    reqs = [RequestSpec(0.0, 1, 2), RequestSpec(0.02, 2, 2), RequestSpec(0.05, 3, 2),
            RequestSpec(0.25, 4, 2)]  # 0.25: idle again, held anew
    channel = Channel.create()
    try:
        result, seen = run(stream_plan(0.02, 0.02), reqs, channel=channel, policy=FINEINFER)
        assert channel.requests_in_flight() == 0
    finally:
        channel.close()
        channel.unlink()
    t0 = result.window_start_s
    recv = {len(s.body["prompt"]): s.received_s - t0 for s in seen}
    assert recv[1] >= 0.04 and recv[2] >= 0.04 and abs(recv[1] - recv[2]) < TOL_S  # held, then together
    assert recv[3] - 0.05 < 0.04  # not held (a hold would last at least defer_s = 0.04 s)
    assert recv[4] >= 0.25 + 0.04
    # send_s is the arrival, so the hold counts in TTFT.
    assert [r.send_s - t0 for r in result.records] == pytest.approx([0.0, 0.02, 0.05, 0.25], abs=TOL_S)
    assert result.records[0].ttft_s >= 0.04 + 0.02


def test_gate_waits_for_the_trainer_iteration_and_counts_held_requests():
    channel = Channel.create()
    observed = {}

    async def plan(request, body, seen):
        observed["in_iteration_at_send"] = channel.trainer_in_iteration()
        return await stream_plan(0.005, 0.005)(request, body, seen)

    async def trainer():  # inside an iteration until 0.1 s after the request is held
        channel.set_trainer_in_iteration(True)
        while channel.requests_in_flight() == 0:
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.1)
        observed["in_flight_while_held"] = channel.requests_in_flight()
        channel.set_trainer_in_iteration(False)

    async def both():
        seen: list[Seen] = []
        wl = Workload((RequestSpec(0.0, 3, 2),), rate_req_s=1.0, seed=0, synthetic=True, description="t")
        t = asyncio.create_task(trainer())
        result = await _serve(plan, wl, seen, channel=channel, policy=FINEINFER)
        await t
        return result, seen

    try:
        result, seen = asyncio.run(both())
        assert channel.requests_in_flight() == 0
    finally:
        channel.close()
        channel.unlink()
    assert observed == {"in_iteration_at_send": False, "in_flight_while_held": 1}
    # Held past defer_s (0.04 s) until the iteration ended (0.1 s after the request was held).
    assert seen[0].received_s - result.records[0].send_s >= 0.1


def test_no_gate_without_an_arrival_gate():
    policy = SharingPolicy(mps=True, gpu_memory_utilization=0.45)
    result, seen = run(stream_plan(0.005, 0.005), [RequestSpec(0.0, 3, 2)], policy=policy)
    assert seen[0].received_s - result.records[0].send_s < TOL_S
