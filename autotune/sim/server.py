"""A vLLM-style engine: iteration-level continuous batching.

Each iteration (vLLM V1's scheduler, chunked prefill on) gives every running
request its next tokens: one for a decoding request, the rest of its prompt
(up to the token budget) for one still in prefill; then it admits waiting
requests first come, first served while the token budget
(``max_num_batched_tokens``), ``max_num_seqs`` and the KV cache allow.
A request's first output token comes at the end of the iteration that
processed the last of its prompt; then one token per iteration.

KV cache, as vLLM V1 manages it: a request holds blocks for the tokens it
has computed; each step allocates what that step's tokens need (a prefill
chunk, or one token per decode). A waiting request is admitted only if its
first chunk fits. When a running request's next step does not fit, the
request admitted last is preempted (all its blocks freed; it goes back to the
front of the queue and later recomputes its prompt and the tokens it has
output, as one prefill that then yields its next token), until the step fits.
Blocks are freed when a request finishes.

Decode-only stretches are advanced in bulk: a run of K iterations with the
same batch has closed-form token times (the KV read grows by one token per
request per step), so it costs one event. A run ends at the first request to
finish, is cut at the iteration in progress when a request arrives or when
the trainer's duty changes, and is then re-planned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from autotune.sim.contention import Contention
from autotune.sim.costs import IterationCost, ServingCostModel
from autotune.sim.events import SERVER, Event
from autotune.sim.profile import Serving
from autotune.workloads.spec import RequestSpec


@dataclass(eq=False)
class SimRequest:
    index: int  # in the workload
    spec: RequestSpec
    send_s: float
    adapter: int | None  # None: the base model (or LoRA serving off)
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0  # output tokens emitted
    token_times: list[float | np.ndarray] = field(default_factory=list)  # floats and arrays, in order
    kv_tokens: int = 0  # cache slots held (whole blocks)
    prefill_target: int = -1  # tokens to compute before the next output token (-1: its prompt)
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.prefill_target < 0:
            self.prefill_target = self.spec.prompt_len

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prefill_target

    def times(self) -> tuple[float, ...]:
        out: list[float] = []
        for part in self.token_times:
            if isinstance(part, float):
                out.append(part)
            else:
                out.extend(part.tolist())
        return tuple(out)


@dataclass
class _Run:
    """Iterations planned from one scheduling decision."""

    decodes: list[SimRequest]
    prefills: list[tuple[SimRequest, int]]  # (request, prompt tokens this iteration); first iteration only
    ends_s: np.ndarray  # end time of each planned iteration, [K]
    trainer_duty: float  # what its durations assumed


class Server:
    def __init__(self, costs: ServingCostModel, cfg: Serving, kv_capacity_tokens: int,
                 contention: Contention | None, next_arrival_s: Callable[[], float],
                 on_done: Callable[[float, SimRequest], list[Event]],
                 on_activity: Callable[[float, float, bool], list[Event]],
                 trainer_duty: Callable[[], float],
                 next_trainer_change_s: Callable[[], float] = lambda: np.inf,
                 lora_serving: bool = False, noise: float = 0.0,
                 rng: np.random.Generator | None = None) -> None:
        self.costs = costs
        self.cfg = cfg
        self.kv_free_tokens = kv_capacity_tokens
        self.contention = contention  # None: nothing else runs on the GPU
        self.next_arrival_s = next_arrival_s  # engine arrival of the next request (inf: none)
        self.on_done = on_done
        self.on_activity = on_activity  # (now, GPU duty, busy) -> events (tells the trainer)
        self.trainer_duty = trainer_duty
        self.next_trainer_change_s = next_trainer_change_s  # when the trainer's duty may change next
        self.lora_serving = lora_serving
        self.noise = noise
        self.rng = rng
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.run: _Run | None = None
        self.iterations = 0  # served iterations, for statistics
        self.preemptions = 0  # requests preempted because the KV cache was full
        self._gen = 0
        self._kicked = False  # a step start is queued

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def block_round(self, tokens: int) -> int:
        b = self.cfg.block_size_tokens
        return -(-tokens // b) * b

    # -- inputs ----------------------------------------------------------
    def add(self, now: float, req: SimRequest) -> list[Event]:
        return self.add_many(now, [req])

    def add_many(self, now: float, reqs: list[SimRequest]) -> list[Event]:
        self.waiting.extend(reqs)
        if self.run is not None or self._kicked or not reqs:
            return []
        # An idle engine starts its next step after every arrival of this instant.
        self._kicked = True
        return [(now, SERVER, self._kick)]

    def _kick(self, now: float) -> list[Event]:
        self._kicked = False
        return self._schedule(now) if self.run is None else []

    def on_trainer(self, now: float, duty: float) -> list[Event]:
        """The trainer's duty changed: cut a bulk run at the iteration in progress."""
        run = self.run
        if run is None or duty == run.trainer_duty or len(run.ends_s) == 1:
            return []
        k = int(np.searchsorted(run.ends_s, now, side="left"))  # iteration in progress
        if k >= len(run.ends_s) - 1:
            return []
        run.ends_s = run.ends_s[:k + 1]
        return [self._end_event()]

    # -- scheduling ------------------------------------------------------
    def _schedule(self, now: float) -> list[Event]:
        decodes, prefills = self._pick_batch()
        if not decodes and not prefills:
            self.run = None
            return self.on_activity(now, 0.0, False)
        adapters = self._adapters(decodes, prefills)
        if prefills:
            durations, duty, events = self._mixed_iteration(now, decodes, prefills, adapters)
        else:
            durations, duty, events = self._decode_run(now, decodes, adapters)
        durations = durations * self._noise(len(durations))
        self.run = _Run(decodes, prefills, now + np.cumsum(durations), duty)
        return [*events, self._end_event()]

    def _pick_batch(self) -> tuple[list[SimRequest], list[tuple[SimRequest, int]]]:
        """This step's batch; allocates its cache slots (preempting when they do not fit)."""
        budget = self.cfg.max_num_batched_tokens
        decodes: list[SimRequest] = []
        prefills: list[tuple[SimRequest, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            tokens = min(r.prefill_target - r.computed, budget) if r.in_prefill else 1
            if not self._allocate(r, tokens):
                break  # r itself was preempted: nothing after it runs either
            if r.in_prefill:
                prefills.append((r, tokens))
            else:
                decodes.append(r)
            budget -= tokens
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            r = self.waiting[0]
            chunk = min(r.prefill_target, budget)
            if self.block_round(chunk) > self.kv_free_tokens:
                break  # FCFS: the head waits for the cache
            self.waiting.popleft()
            self.running.append(r)
            self._allocate(r, chunk)
            prefills.append((r, chunk))
            budget -= chunk
        return decodes, prefills

    def _allocate(self, r: SimRequest, tokens: int) -> bool:
        """Slots for ``tokens`` more of ``r``; preempts the request admitted last
        (r itself at the end) until they fit. False if r was preempted."""
        while True:
            need = self.block_round(r.computed + tokens) - r.kv_tokens
            if need <= self.kv_free_tokens:
                self.kv_free_tokens -= need
                r.kv_tokens += need
                return True
            victim = self.running.pop()
            self._preempt(victim)
            if victim is r:
                return False

    def _preempt(self, r: SimRequest) -> None:
        """Free all of r's blocks; it recomputes its prompt and output so far when readmitted."""
        self.kv_free_tokens += r.kv_tokens
        r.kv_tokens = 0
        r.computed = 0
        r.prefill_target = r.spec.prompt_len + r.generated
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _adapters(self, decodes: list[SimRequest], prefills: list[tuple[SimRequest, int]]) -> int:
        if not self.lora_serving:
            return 0
        ids = {r.adapter for r in decodes} | {r.adapter for r, _ in prefills}
        ids.discard(None)
        return len(ids)

    def _stretch(self, now: float, cost: IterationCost) -> tuple[list[Event], float, float, float]:
        """Tell the trainer what we are about to do (our GPU duty: the GPU
        share of the iteration's solo time); returns (its events, its
        duty, our memory-time and compute-time stretch)."""
        # Rounded: the trainer is re-timed only when this changes noticeably.
        duty = round(1.0 - cost.fixed_s / self.costs.duration_s(cost), 2)
        events = self.on_activity(now, duty, True)
        if self.contention is None:
            return events, 0.0, 1.0, 1.0
        o_t = self.trainer_duty()
        mem, comp = self.contention.server_stretch(o_t)
        return events, o_t, mem, comp

    def _mixed_iteration(self, now: float, decodes: list[SimRequest], prefills: list[tuple[SimRequest, int]],
                         adapters: int) -> tuple[np.ndarray, float, list[Event]]:
        ctx = sum(r.computed + 1 for r in decodes)  # the cache each decode reads, its new token included
        prefill_tokens = sum(c for _, c in prefills)
        pairs = sum(c * (r.computed + c / 2) for r, c in prefills)
        cost = self.costs.iteration(len(decodes), ctx, prefill_tokens, pairs, len(decodes) + len(prefills), adapters)
        events, o_t, mem, comp = self._stretch(now, cost)
        return np.array([self.costs.duration_s(cost, mem, comp)]), o_t, events

    def _decode_run(self, now: float, decodes: list[SimRequest], adapters: int
                    ) -> tuple[np.ndarray, float, list[Event]]:
        steps = min(self._decode_steps_that_fit(decodes), min(r.spec.output_len - r.generated for r in decodes))
        ctx = sum(r.computed + 1 for r in decodes)
        first = self.costs.iteration(len(decodes), ctx, 0, 0.0, len(decodes), adapters)
        events, duty, mem, comp = self._stretch(now, first)
        # Plan no further than the next arrival or change of the trainer's state
        # (iterations only get longer as the KV cache grows, so this covers it).
        horizon = min(self.next_arrival_s(), self.next_trainer_change_s())
        if horizon < np.inf:
            steps = min(steps, int((horizon - now) / self.costs.duration_s(first, mem, comp)) + 2)
        durations = self.costs.decode_run_s(len(decodes), ctx, steps, adapters, mem, comp)
        arrival = self.next_arrival_s()
        if arrival < now + durations.sum():
            # Cut at the iteration in progress when the next request arrives.
            k = int(np.searchsorted(now + np.cumsum(durations), arrival, side="left"))
            durations = durations[:k + 1]
        return durations, duty, events

    def _decode_steps_that_fit(self, decodes: list[SimRequest]) -> int:
        """How many decode steps the cache holds for this batch (the first is allocated already)."""
        computed = np.array([r.computed for r in decodes])
        held = np.array([r.kv_tokens for r in decodes])
        b = self.cfg.block_size_tokens

        def fits(k: int) -> bool:  # k steps: each request's k tokens
            return int((-(-(computed + k) // b) * b - held).sum()) <= self.kv_free_tokens

        lo, hi = 1, max(r.spec.output_len - r.generated for r in decodes)
        if fits(hi):
            return hi
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _noise(self, n: int) -> np.ndarray | float:
        if self.noise <= 0 or self.rng is None:
            return 1.0
        s = self.noise
        return np.exp(self.rng.normal(-0.5 * s * s, s, size=n))

    def _end_event(self) -> Event:
        self._gen += 1
        gen = self._gen
        assert self.run is not None
        return (float(self.run.ends_s[-1]), SERVER, lambda t: self._run_end(t, gen))

    # -- completion ------------------------------------------------------
    def _allocate_run(self, r: SimRequest) -> None:
        """Slots for the steps of a bulk decode run after its first (planned to fit)."""
        need = self.block_round(r.computed) - r.kv_tokens
        if need > 0:
            assert need <= self.kv_free_tokens, (need, self.kv_free_tokens)
            self.kv_free_tokens -= need
            r.kv_tokens += need

    def _run_end(self, now: float, gen: int) -> list[Event]:
        if gen != self._gen:
            return []  # cut short since
        run = self.run
        assert run is not None
        k = len(run.ends_s)
        self.iterations += k
        events: list[Event] = []
        for r in run.decodes:
            r.token_times.append(run.ends_s if k > 1 else float(run.ends_s[0]))
            r.generated += k
            r.computed += k
            self._allocate_run(r)
        for r, chunk in run.prefills:
            r.computed += chunk
            if not r.in_prefill:  # its prompt (and any output to recompute) is in: the next token
                r.token_times.append(float(run.ends_s[0]))
                r.generated += 1
        finished = [r for r in self.running if r.generated >= r.spec.output_len]
        if finished:
            self.running = [r for r in self.running if r.generated < r.spec.output_len]
            for r in finished:
                self.kv_free_tokens += r.kv_tokens
                events += self.on_done(now, r)
        self.run = None
        return [*events, *self._schedule(now)]
