"""The load generator: replays a ``Workload`` against an OpenAI-compatible
server and times every output token.

Each request is sent at its arrival time (relative to a common start) as a
streaming ``POST /v1/completions`` with a prompt of random token ids (its own
seeded generator), ``max_tokens`` = the output length and EOS ignored, greedy
as ``vllm bench serve`` sends it. Times are ``time.time()``, the clock the
trainer in another process shares.

Counting tokens in a stream: vLLM may put several tokens in one SSE chunk
(when the client reads slower than the engine steps). We ask for
``continuous_usage_stats``, so each chunk carries the cumulative
``completion_tokens``; the difference to the previous chunk is the number of
tokens the chunk brought, and all of them get the chunk's arrival time (vLLM's
own benchmark also gives a chunk one time). A chunk without usage counts
``len(token_ids)`` if the server sends those, else one token. If the final
usage says more tokens came than were counted, the rest get the last chunk's
time. So TTFT and TPOT are exact; ITL has a zero gap inside a multi-token
chunk, where vLLM's benchmark has one gap per chunk.

FineInfer's deferral gate (the sharing policy's ``arrival_gate``): a request
arriving at an idle server (none in flight) is held ``defer_s``, and requests
arriving meanwhile join it; then the batch waits until the trainer is not
inside an iteration (polled every ``poll_s``), and all are sent together.
Held requests count as in flight, so the trainer starts no new iteration.
A request's ``send_s`` is its arrival, so time held counts in its TTFT, as it
would inside FineInfer's engine.

Errors (HTTP errors, dropped connections, timeouts, error chunks) go into the
request's record; nothing is raised.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from autotune.gpu.channel import Channel
from autotune.gpu.modelfiles import adapter_name, token_text
from autotune.metrics import RequestRecord
from autotune.policy import ArrivalGate, SharingPolicy
from autotune.workloads.spec import RequestSpec, Workload

#: progress(fraction of requests finished, in [0, 1])
ReplayProgress = Callable[[float], None]

# Random prompt ids keep clear of both ends of the vocabulary, where the
# presets keep special tokens (Llama-2's first ids, Llama-3's reserved top 256).
_EDGE_IDS = 256
_START_LEAD_S = 0.05  # the common start is this far after the prompts are ready


@dataclass(frozen=True)
class ReplayResult:
    records: list[RequestRecord]  # in workload order
    window_start_s: float  # time.time() of the first arrival
    window_end_s: float  # time.time() when the last request finished


def prompt_token_ids(rng: np.random.Generator, prompt_len: int, vocab_size: int) -> list[int]:
    """``prompt_len`` ids drawn uniformly from [256, vocab_size - 256)."""
    assert vocab_size > 4 * _EDGE_IDS, f"vocab of {vocab_size} ids is too small for random prompts"
    return rng.integers(_EDGE_IDS, vocab_size - _EDGE_IDS, size=prompt_len).tolist()


def prompt_text(token_ids: list[int]) -> str:
    """The same prompt as text for a server with our one-word-per-id tokenizer
    (``autotune.gpu.modelfiles``): it tokenizes back to exactly these ids."""
    return " ".join(token_text(i) for i in token_ids)


def request_body(spec: RequestSpec, prompt: list[int] | str, model_name: str) -> dict[str, Any]:
    return {
        "model": model_name if spec.adapter is None else adapter_name(spec.adapter),
        "prompt": prompt,
        "max_tokens": spec.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def tokens_in_chunk(chunk: dict[str, Any], counted: int) -> int:
    """Output tokens one SSE chunk brought, given ``counted`` so far (see the module doc)."""
    choices = chunk.get("choices") or []
    if not choices:
        return 0  # the final usage-only chunk
    usage = chunk.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        return max(0, usage["completion_tokens"] - counted)
    token_ids = choices[0].get("token_ids")
    return len(token_ids) if token_ids is not None else 1


async def _read_stream(resp: aiohttp.ClientResponse, token_times: list[float]) -> str | None:
    """Append each token's arrival time; the error, or None if the stream ended well."""
    final_tokens: int | None = None  # completion_tokens of the last usage seen
    async for raw in resp.content:  # one line at a time
        now = time.time()
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            missing = (final_tokens or 0) - len(token_times)
            if missing > 0:
                token_times.extend([token_times[-1] if token_times else now] * missing)
            return None
        chunk = json.loads(data)
        if "error" in chunk:
            return f"server error: {' '.join(json.dumps(chunk['error']).split())[:200]}"
        token_times.extend([now] * tokens_in_chunk(chunk, len(token_times)))
        final_tokens = (chunk.get("usage") or {}).get("completion_tokens", final_tokens)
    return "stream ended before [DONE]"


async def _stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      timeout_s: float, token_times: list[float]) -> str | None:
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                text = " ".join((await resp.text()).split())
                return f"HTTP {resp.status}: {text[:200]}"
            return await _read_stream(resp, token_times)
    except asyncio.TimeoutError:
        return f"timeout after {timeout_s:g} s"
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: bad JSON or an over-long line
        return f"{type(e).__name__}: {e}"


class _InFlight:
    """Requests in flight (sent and not finished, plus held at the gate),
    mirrored into the channel for the trainer."""

    def __init__(self, channel: Channel | None) -> None:
        self.count = 0
        self._channel = channel

    def add(self, delta: int) -> None:
        self.count += delta
        if self._channel is not None:
            self._channel.add_in_flight(delta)


class _DeferralGate:
    """FineInfer's gate (see the module doc). One event loop, so no locks."""

    def __init__(self, gate: ArrivalGate, channel: Channel | None, in_flight: _InFlight) -> None:
        self._gate = gate
        self._channel = channel
        self._in_flight = in_flight
        self._held: asyncio.Future[None] | None = None  # the batch being held, if any
        self._releaser: asyncio.Task[None] | None = None  # releases the held batch

    def arrive(self) -> asyncio.Future[None] | None:
        """Count one arrival in flight; the future to await before sending, if held."""
        idle = self._in_flight.count == 0
        self._in_flight.add(+1)
        if self._held is None and idle:
            self._held = asyncio.get_running_loop().create_future()
            self._releaser = asyncio.create_task(self._release(self._held))
        return self._held

    async def _release(self, held: asyncio.Future[None]) -> None:
        try:
            await asyncio.sleep(self._gate.defer_s)
            while self._channel is not None and self._channel.trainer_in_iteration():
                await asyncio.sleep(self._gate.poll_s)
        finally:
            self._held = None
            if not held.done():
                held.set_result(None)


async def replay(url: str, workload: Workload, *, model_name: str, vocab_size: int, seed: int,
                 channel: Channel | None = None, policy: SharingPolicy | None = None,
                 progress: ReplayProgress | None = None, request_timeout_s: float = 600.0,
                 prompt_as_text: bool = False) -> ReplayResult:
    """Send every request of ``workload`` at its arrival time; records in workload order.

    ``prompt_as_text``: send prompts as text (the server tokenizes them, as it
    does for ``vllm bench serve`` and for real clients) instead of token ids.
    """
    rng = np.random.default_rng(seed)
    prompts = [prompt_token_ids(rng, spec.prompt_len, vocab_size) for spec in workload.requests]
    bodies = [request_body(spec, prompt_text(p) if prompt_as_text else p, model_name)
              for spec, p in zip(workload.requests, prompts)]
    in_flight = _InFlight(channel)
    gate = (_DeferralGate(policy.arrival_gate, channel, in_flight)
            if policy is not None and policy.arrival_gate is not None else None)
    finished = 0

    async def one(session: aiohttp.ClientSession, spec: RequestSpec, body: dict[str, Any],
                  start_s: float) -> RequestRecord:
        nonlocal finished
        await asyncio.sleep(max(0.0, start_s + spec.arrival_s - time.time()))
        send_s = time.time()
        token_times: list[float] = []
        if gate is not None:
            held = gate.arrive()
        else:
            in_flight.add(+1)
            held = None
        try:
            if held is not None:
                await held
            error = await _stream_one(session, url, body, request_timeout_s, token_times)
        finally:
            in_flight.add(-1)
            finished += 1
            if progress is not None:
                progress(finished / len(bodies))
        return RequestRecord(prompt_len=spec.prompt_len, output_len=spec.output_len, send_s=send_s,
                             token_times_s=tuple(token_times), error=error, adapter=spec.adapter)

    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on concurrent requests
    async with aiohttp.ClientSession(connector=connector) as session:
        start_s = time.time() + _START_LEAD_S
        records = await asyncio.gather(*(one(session, spec, body, start_s)
                                         for spec, body in zip(workload.requests, bodies)))
    return ReplayResult(records=list(records), window_start_s=start_s, window_end_s=time.time())


def replay_sync(url: str, workload: Workload, **kwargs: Any) -> ReplayResult:
    """``replay`` in a fresh event loop (for the backend's synchronous code)."""
    return asyncio.run(replay(url, workload, **kwargs))
