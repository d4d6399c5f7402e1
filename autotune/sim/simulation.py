"""One simulated trial: the load generator, the engine, the trainer and the
sharing policy between them, on one event queue.

Timeline: the trainer (if any) starts at t = 0; request i is sent at
``warmup_s + arrival_s`` and reaches the engine ``frontend_delay_ms`` later.
The PEFT measurement window is the serving window (first send to last
token); with no serving it is ``TRAINER_ALONE_WINDOW_S`` after the warm-up.

The sharing policy (``autotune.policy``), read here and nowhere else:
- its pause plan cuts the trainer's step into segments (``plan_segments``):
  at each pause point, if requests are in flight, the trainer sleeps that
  pass's wait (LLMStation); otherwise it overlaps under MPS (contention);
- its arrival gate (FineInfer): a request reaching an idle engine is held
  ``defer_s`` (later arrivals join it), then until the trainer's iteration
  in progress ends (polled every ``poll_s``); ``trainer_may_start`` keeps
  the trainer from starting an iteration while any request is in flight, so
  they never overlap. A serving-alone (reference) trial has no gate: it
  serves at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autotune.backends._base import ProgressFn, no_progress
from autotune.memory import MemoryPlan, plan_for_trial
from autotune.metrics import RequestRecord, TrainerIteration
from autotune.sim.contention import Contention
from autotune.sim.costs import ServingCostModel, TrainerCostModel
from autotune.sim.events import ARRIVAL, CONTROL, Event, EventQueue
from autotune.sim.profile import Profile
from autotune.sim.server import Server, SimRequest
from autotune.sim.trainer import Channel, TrainerSim, plan_segments
from autotune.trial import TrialSpec

#: Measurement window of a trial with no serving, after the warm-up, s.
TRAINER_ALONE_WINDOW_S = 60.0


@dataclass(frozen=True)
class SimOutcome:
    records: list[RequestRecord]
    iterations: list[TrainerIteration]
    window_s: tuple[float, float] | None  # PEFT measurement window; None: none measurable
    kv_capacity_tokens: int
    server_iterations: int
    preemptions: int  # requests the engine preempted because the KV cache was full
    events: int
    end_s: float  # simulated clock at the end
    memory: MemoryPlan  # the per-GPU split the trial ran with


def memory_plan(spec: TrialSpec, profile: Profile) -> MemoryPlan:
    """The trial's per-GPU memory plan on the profile's machine (``TrialCrash`` if it cannot fit)."""
    return plan_for_trial(spec, gpus=profile.gpus, gpu_memory_gib=profile.datasheet.gpu_memory_gib,
                          server_reserve_gib=profile.serving.activation_reserve_gib,
                          max_model_len=profile.serving.max_model_len,
                          block_size_tokens=profile.serving.block_size_tokens)


class Simulation:
    def __init__(self, spec: TrialSpec, profile: Profile, noise: float = 0.0,
                 rng: np.random.Generator | None = None, progress: ProgressFn = no_progress) -> None:
        self.spec = spec
        self.profile = profile
        self.policy = spec.policy
        self.progress = progress
        self.queue = EventQueue()
        self.channel = Channel()
        self.memory = memory_plan(spec, profile)
        serves = spec.serves and spec.workload is not None and len(spec.workload) > 0
        self.offset_s = spec.warmup_s if spec.trains else 0.0
        contention = Contention(profile.mps, self.policy.mps, self.policy.trainer_mps_active_thread_pct / 100.0)
        self.trainer = self._make_trainer(contention, noise, rng) if spec.trains else None
        self.server = self._make_server(contention, noise, rng) if serves else None
        self.requests: list[SimRequest] = []
        self.records: dict[int, RequestRecord] = {}
        self._sent = 0
        self._delivered = 0
        self._done = 0
        self._valid = 0
        self._held: list[SimRequest] | None = None  # FineInfer: requests held by the deferral gate
        self._next_report = 0.1

    # -- construction ------------------------------------------------------
    def _make_trainer(self, contention: Contention, noise: float, rng: np.random.Generator | None) -> TrainerSim:
        costs = TrainerCostModel(self.spec.model, self.profile, self.policy.trainer_seq_len_tokens,
                                 self.spec.trainer_lora_rank)
        return TrainerSim(
            segments=plan_segments(costs.tasklets(), self.policy),
            tokens_per_iteration=self.policy.trainer_seq_len_tokens * costs.samples_per_step,
            params=self.profile.trainer,
            contention=contention,
            channel=self.channel,
            on_duty=self._trainer_duty_changed,
            may_start=self._trainer_may_start,
            noise=noise,
            rng=rng,
        )

    def _make_server(self, contention: Contention, noise: float, rng: np.random.Generator | None) -> Server:
        lora = self.spec.lora_serving
        costs = ServingCostModel(self.spec.model, self.profile, lora.rank if lora else None)
        return Server(
            costs, self.profile.serving,
            self.memory.kv_capacity_tokens(self.spec.model, self.profile.serving.block_size_tokens),
            contention=contention if self.trainer is not None else None,
            next_arrival_s=self._next_engine_arrival_s,
            on_done=self._request_done,
            on_activity=self._server_activity,
            trainer_duty=lambda: self.trainer.duty if self.trainer is not None else 0.0,
            next_trainer_change_s=lambda: self.trainer.next_change_s if self.trainer is not None else math.inf,
            lora_serving=lora is not None, noise=noise, rng=rng,
        )

    # -- running -----------------------------------------------------------
    def run(self) -> SimOutcome:
        if self.trainer is not None:
            self.queue.push(0.0, CONTROL, self.trainer.start)
        if self.server is not None:
            self._prepare_requests()
        if self.server is not None and self._valid > 0:
            self.queue.push(self._send_time(0), ARRIVAL, self._send)
            horizon = self._serving_horizon_s()
            end = self.queue.run(until_s=horizon, stop=lambda: self._done >= self._valid)
            window = self._serving_window()
        else:
            end = self.offset_s + TRAINER_ALONE_WINDOW_S if self.trainer is not None else 0.0
            if self.trainer is not None:
                self.queue.run(until_s=end)
            window = (self.offset_s, end) if self.trainer is not None and self.server is None else None
        if self.trainer is not None:
            self.trainer.finish(end)
        self.progress(1.0, "simulated")
        return SimOutcome(
            records=self._records(end),
            iterations=list(self.trainer.iterations) if self.trainer is not None else [],
            window_s=window,
            kv_capacity_tokens=self.server.kv_free_tokens if self.server is not None else 0,
            server_iterations=self.server.iterations if self.server is not None else 0,
            preemptions=self.server.preemptions if self.server is not None else 0,
            events=self.queue.handled,
            end_s=end,
            memory=self.memory,
        )

    def _prepare_requests(self) -> None:
        assert self.spec.workload is not None and self.server is not None
        max_len = self.profile.serving.max_model_len
        capacity = self.server.kv_free_tokens
        lora = self.spec.lora_serving is not None
        for i, rs in enumerate(self.spec.workload.requests):
            req = SimRequest(i, rs, self._send_time(i), rs.adapter if lora else None)
            self.requests.append(req)
            error = None
            if rs.prompt_len < 1 or rs.output_len < 1:
                error = "prompt and output need at least one token"
            elif rs.prompt_len + rs.output_len > max_len:
                error = f"prompt + output {rs.prompt_len + rs.output_len} tokens > max_model_len {max_len}"
            elif self.server.block_round(rs.prompt_len + rs.output_len) > capacity:
                error = "request larger than the whole KV cache"
            if error is not None:
                self.records[i] = RequestRecord(rs.prompt_len, rs.output_len, req.send_s, (), error, rs.adapter)
            else:
                self._valid += 1

    def _send_time(self, i: int) -> float:
        assert self.spec.workload is not None
        return self.offset_s + self.spec.workload.requests[i].arrival_s

    def _serving_horizon_s(self) -> float:
        """Stop even if the engine never drains (a runaway queue): generous bound."""
        assert self.spec.workload is not None
        return self.offset_s + 10.0 * self.spec.workload.duration_s + 3600.0

    def _serving_window(self) -> tuple[float, float] | None:
        ok = [r for r in self.records.values() if r.ok]
        if not ok:
            return None
        start = min(r.send_s for r in self.records.values())
        end = max(r.token_times_s[-1] for r in ok)
        return (start, end) if end > start else None

    def _records(self, end: float) -> list[RequestRecord]:
        out = []
        for i, req in enumerate(self.requests):
            rec = self.records.get(i)
            if rec is None:  # never finished: the run hit its horizon
                rec = RequestRecord(req.spec.prompt_len, req.spec.output_len, req.send_s, req.times(),
                                    f"not finished after {end - req.send_s:.0f} s", req.spec.adapter)
            out.append(rec)
        return out

    # -- load generator and the deferral gate -------------------------------
    def _send(self, now: float) -> list[Event]:
        i = self._sent
        self._sent += 1
        events: list[Event] = []
        if self._sent < len(self.requests):
            events.append((self._send_time(self._sent), ARRIVAL, self._send))
        if i not in self.records:  # rejected ones never reach the engine
            self.channel.requests_in_flight += 1
            delay = self.profile.serving.frontend_delay_ms / 1000.0
            events.append((now + delay, ARRIVAL, lambda t: self._deliver(t, i)))
        return events

    def _next_engine_arrival_s(self) -> float:
        delay = self.profile.serving.frontend_delay_ms / 1000.0
        while self._delivered < len(self.requests) and self._delivered in self.records:
            self._delivered += 1  # skip rejected ones
        if self._delivered >= len(self.requests):
            return math.inf
        return self.requests[self._delivered].send_s + delay

    def _deliver(self, now: float, i: int) -> list[Event]:
        self._delivered = max(self._delivered, i + 1)
        req = self.requests[i]
        assert self.server is not None
        gate = self.policy.arrival_gate
        if gate is None or self.trainer is None:
            return self.server.add(now, req)  # the deferral gate exists for the trainer's sake
        if self._held is not None:
            self._held.append(req)
            return []
        if self.server.has_work:
            return self.server.add(now, req)
        self._held = [req]  # an idle engine: defer, batching later arrivals
        return [(now + gate.defer_s, CONTROL, self._gate)]

    def _gate(self, now: float) -> list[Event]:
        """FineInfer: after the deferral, wait for the trainer's iteration to end."""
        gate = self.policy.arrival_gate
        assert gate is not None
        if self.channel.trainer_in_iteration:
            return [(now + gate.poll_s, CONTROL, self._gate)]
        held, self._held = self._held or [], None
        assert self.server is not None
        return self.server.add_many(now, held)

    # -- coupling ----------------------------------------------------------
    def _request_done(self, now: float, req: SimRequest) -> list[Event]:
        rs = req.spec
        self.records[req.index] = RequestRecord(rs.prompt_len, rs.output_len, req.send_s, req.times(),
                                                None, rs.adapter)
        self._done += 1
        self.channel.requests_in_flight -= 1
        if self._done >= self._next_report * self._valid:
            self.progress(0.99 * self._done / self._valid, f"{self._done}/{self._valid} requests")
            self._next_report += 0.1
        if self.trainer is not None and self.policy.trainer_may_start(self.channel.requests_in_flight):
            return self.trainer.resume(now)  # an idle trainer (held by the gate) starts
        return []

    def _server_activity(self, now: float, duty: float, busy: bool) -> list[Event]:
        if self.trainer is None:
            return []
        return self.trainer.on_server(now, duty, busy)

    def _trainer_duty_changed(self, now: float, duty: float) -> list[Event]:
        if self.server is None:
            return []
        return self.server.on_trainer(now, duty)

    def _trainer_may_start(self) -> bool:
        return self.policy.trainer_may_start(self.channel.requests_in_flight)
