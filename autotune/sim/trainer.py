"""The LoRA trainer as tasklets, grouped into segments between pause points.

One training step is: embeddings, one tasklet per decoder layer forward,
head + loss, one tasklet per decoder layer backward (recompute + backward),
the optimizer step. A *segment* is a run of tasklets the trainer executes
without looking at the channel: a whole pass when it never pauses, or the
``forward_tasklets`` / ``backward_tasklets`` tasklets between two pause
points (LLMStation). The host can run ahead of the GPU inside a segment; a
pause point synchronises, so a segment lasts

    smooth_max(host time, GPU time / speed share) + pause check cost.

While a segment runs, its progress advances at a rate set by what the server
is doing; when that changes, the remaining work is re-timed (a fluid model),
so the trainer needs no event per tasklet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from autotune.metrics import TrainerIteration
from autotune.policy import BACKWARD, FORWARD, PausePlan, SharingPolicy
from autotune.sim.contention import Contention
from autotune.sim.costs import Tasklet, smooth_max
from autotune.sim.events import TRAINER, Event
from autotune.sim.profile import Trainer as TrainerParams


@dataclass(frozen=True)
class Segment:
    host_s: float  # CPU time to issue its tasklets
    gpu_s: float  # their GPU time with the whole GPU
    compute_share: float  # GPU-time-weighted compute-boundness, 0..1
    comm_s: float  # FSDP collectives it waits for (the link, not the SMs), s
    tasklets: int
    pause_wait_s: float | None  # None: no pause point at its end; else the wait if requests are in flight


def plan_segments(tasklets: list[Tasklet], policy: SharingPolicy) -> list[Segment]:
    """Group one step's tasklets into segments, cut at the policy's pause points.

    The forward pass's pause points count its layer and head tasklets
    (``num_layers + 1``, LLMStation's per-layer yields; the embeddings run
    with the first layer); the backward pass's count its layer tasklets. A
    pass with no pause point is one segment; the optimizer step is the last.
    """
    forward = [t for t in tasklets if t.name == "embed" or t.name.endswith(".fwd") or t.name == "head_loss"]
    backward = [t for t in tasklets if t.name.endswith(".bwd")]
    rest = [t for t in tasklets if t.name == "optimizer"]
    assert len(forward) + len(backward) + len(rest) == len(tasklets), [t.name for t in tasklets]
    # The embeddings do not count: they are issued with the first layer.
    segments = _pass_segments(forward[1:], FORWARD, policy.pause_plan, carried=forward[:1])
    segments += _pass_segments(backward, BACKWARD, policy.pause_plan)
    if rest:
        segments.append(_segment(rest, None))
    return segments


def _pass_segments(counted: list[Tasklet], pass_name: str, plan: PausePlan,
                   carried: list[Tasklet] | None = None) -> list[Segment]:
    """One pass's segments: a cut after each counted tasklet with a pause
    point; ``carried`` tasklets run at the start of the first segment."""
    segments: list[Segment] = []
    group = list(carried or [])
    for i, t in enumerate(counted):
        group.append(t)
        wait_s = plan.wait_after_s(pass_name, i, len(counted))
        if wait_s is not None:
            segments.append(_segment(group, wait_s))
            group = []
    if group:
        segments.append(_segment(group, None))
    return segments


def _segment(group: list[Tasklet], pause_wait_s: float | None) -> Segment:
    gpu = sum(t.gpu_s for t in group)
    share = sum(t.gpu_s * t.gpu_compute_share for t in group) / gpu if gpu > 0 else 0.0
    return Segment(sum(t.host_s for t in group), gpu, share, sum(t.comm_s for t in group), len(group),
                   pause_wait_s)


@dataclass
class Channel:
    """What the server side and the trainer tell each other (the GPU
    backend's shared-memory channel)."""

    requests_in_flight: int = 0  # sent, not finished
    trainer_in_iteration: bool = False


@dataclass
class TrainerSim:
    segments: list[Segment]
    tokens_per_iteration: int
    params: TrainerParams
    contention: Contention
    channel: Channel
    # Called with (now, duty) when the trainer's GPU duty changes; returns events.
    on_duty: Callable[[float, float], list[Event]]
    # Called at an iteration's end: may the next one start now? (FineInfer's gate)
    may_start: Callable[[], bool]
    noise: float = 0.0  # relative std of the multiplicative lognormal on segment times
    rng: np.random.Generator | None = None

    iterations: list[TrainerIteration] = field(default_factory=list)
    duty: float = 0.0  # fraction of wall time its kernels are on the GPU now
    state: str = "idle"  # "idle" | "run" | "sleep"
    _index: int = 0  # segment in progress
    _remaining: float = 0.0  # fraction of the segment left
    _seconds: float = 0.0  # its duration at the current rate, s
    _noise_factor: float = 1.0
    _since_s: float = 0.0  # when _remaining was last brought up to date
    _iter_start_s: float = 0.0
    _gen: int = 0  # invalidates end events of a re-timed segment
    next_change_s: float = math.inf  # time of its next scheduled event (segment end or wake)
    _server_duty: float = 0.0
    _server_busy: bool = False

    # -- the server tells us what it does --------------------------------
    def on_server(self, now: float, duty: float, busy: bool) -> list[Event]:
        """The server's duty changed: re-time the segment in progress."""
        if duty == self._server_duty and busy == self._server_busy:
            return []
        self._server_duty, self._server_busy = duty, busy
        if self.state != "run":
            return []
        self._advance(now)
        self._retime()
        # The server reads the new duty itself (it is the caller).
        self.duty = self._segment_duty()
        return [self._end_event(now)]

    # -- own life cycle --------------------------------------------------
    def start(self, now: float) -> list[Event]:
        """Begin an iteration (the caller checked that it may)."""
        assert self.state == "idle", self.state
        self.channel.trainer_in_iteration = True
        self._iter_start_s = now
        return self._begin_segment(now, 0)

    def finish(self, now: float) -> None:
        """Record the iteration in progress pro rata (end of the measurement)."""
        if self.state == "idle":
            return
        self._advance(now)
        solo = [smooth_max(s.host_s, s.gpu_s + s.comm_s, self.params.host_gpu_sharpness) for s in self.segments]
        current = solo[self._index] * (1.0 - self._remaining if self.state == "run" else 1.0)
        frac = (sum(solo[:self._index]) + current) / sum(solo)  # of the step's work, solo-weighted
        if now > self._iter_start_s and frac > 0:
            self.iterations.append(TrainerIteration(self._iter_start_s, now, self.tokens_per_iteration * frac))

    def _begin_segment(self, now: float, index: int) -> list[Event]:
        self.state = "run"
        self._index = index
        self._remaining = 1.0
        self._since_s = now
        self._noise_factor = self._draw_noise()
        self._retime()
        return [self._end_event(now), *self._set_duty(now, self._segment_duty())]

    def _segment_end(self, now: float, gen: int) -> list[Event]:
        if gen != self._gen or self.state != "run":
            return []  # re-timed since
        seg = self.segments[self._index]
        wait = seg.pause_wait_s
        if wait is not None and wait > 0 and self.channel.requests_in_flight > 0:
            self.state = "sleep"
            self._gen += 1
            gen = self._gen
            self.next_change_s = now + wait
            wake: Event = (now + wait, TRAINER, lambda t: self._wake(t, gen))
            return [wake, *self._set_duty(now, 0.0)]
        return self._next(now)

    def _wake(self, now: float, gen: int) -> list[Event]:
        if gen != self._gen:
            return []
        return self._next(now)

    def _next(self, now: float) -> list[Event]:
        if self._index + 1 < len(self.segments):
            return self._begin_segment(now, self._index + 1)
        self.iterations.append(TrainerIteration(self._iter_start_s, now, self.tokens_per_iteration))
        self.channel.trainer_in_iteration = False
        if self.may_start():
            self._iter_start_s = now
            self.channel.trainer_in_iteration = True
            return self._begin_segment(now, 0)
        self.state = "idle"
        self.next_change_s = math.inf
        return self._set_duty(now, 0.0)

    def resume(self, now: float) -> list[Event]:
        """The gate opened: start an iteration if idle."""
        return self.start(now) if self.state == "idle" else []

    # -- timing ----------------------------------------------------------
    def _segment_seconds(self, seg: Segment) -> tuple[float, float]:
        """(duration s, GPU duty) of a whole segment at the current rates."""
        c = self.contention
        host = seg.host_s * c.trainer_host_stretch(self._server_busy)
        gpu_full = seg.gpu_s * c.trainer_gpu_stretch(self._server_duty, seg.compute_share)
        active = gpu_full / c.trainer_speed  # GPU-active time at its speed share
        pause_s = self.params.pause_check_ms / 1000.0 if seg.pause_wait_s is not None else 0.0
        # The host runs ahead of kernels and collectives alike; collectives keep the SMs free.
        seconds = float(smooth_max(host, active + seg.comm_s, self.params.host_gpu_sharpness)) + pause_s
        return seconds, min(1.0, active / seconds)

    def _segment_duty(self) -> float:
        return self._segment_seconds(self.segments[self._index])[1]

    def _retime(self) -> None:
        self._seconds = self._segment_seconds(self.segments[self._index])[0] * self._noise_factor

    def _advance(self, now: float) -> None:
        if self.state == "run" and self._seconds > 0:
            self._remaining = max(0.0, self._remaining - (now - self._since_s) / self._seconds)
        self._since_s = now

    def _end_event(self, now: float) -> Event:
        self._gen += 1
        gen = self._gen
        self.next_change_s = now + self._remaining * self._seconds
        return (self.next_change_s, TRAINER, lambda t: self._segment_end(t, gen))

    def _set_duty(self, now: float, duty: float) -> list[Event]:
        if math.isclose(duty, self.duty, rel_tol=1e-9, abs_tol=1e-12):
            return []
        self.duty = duty
        return self.on_duty(now, duty)

    def _draw_noise(self) -> float:
        if self.noise <= 0 or self.rng is None:
            return 1.0
        s = self.noise
        return float(np.exp(self.rng.normal(-0.5 * s * s, s)))
