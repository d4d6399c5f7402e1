"""Sharing policies: what a system's knobs mean to the parts that run a trial.

The four systems are four policies over the same parts (a vLLM-style server,
one LoRA trainer whose step runs as tasklets, a load generator, and a channel
between them). A ``SharingPolicy`` is the one object that says how they
share the GPUs; both backends, ``sim`` and ``gpu``, read it and nothing else
of the system that made it, and neither branches on which system it is:

- where the trainer stops for inference: its ``pause_plan`` (pause points
  between tasklets, and the wait at each; none: it never stops inside an
  iteration) and ``trainer_may_start`` (whether an iteration may begin with
  requests in flight);
- the load generator's ``arrival_gate`` (FineInfer's deferral), if any;
- MPS: whether the daemon runs, and the trainer's active-thread percentage;
- the trainer's sequence length;
- the memory model: vLLM's share of each GPU, and whether the trainer trains
  on the server's copy of the base weights or holds its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: Tokens in one PEFT sample; throughput is reported in samples of this length.
SAMPLE_TOKENS = 512

#: The two passes of a training step, as pause plans and the tasklets name them.
FORWARD = "forward"
BACKWARD = "backward"


def num_forward_tasklets(num_layers: int) -> int:
    """Counted forward tasklets: one per decoder layer (the first also runs the
    embeddings) and the head."""
    return num_layers + 1


def num_backward_tasklets(num_layers: int) -> int:
    """Counted backward tasklets: one per decoder layer."""
    return num_layers


@dataclass(frozen=True)
class PausePlan:
    """LLMStation's pause points. In each pass, one falls after every N
    counted tasklets and at the pass's end (so a pass of n tasklets has
    ceil(n / N)); at each, if requests are in flight, the trainer sleeps that
    pass's wait. N = 0: no pause point in that pass (the default: a trainer
    that never stops inside an iteration)."""

    forward_tasklets: int = 0
    forward_wait_s: float = 0.0
    backward_tasklets: int = 0
    backward_wait_s: float = 0.0

    def __post_init__(self) -> None:
        assert min(self.forward_tasklets, self.backward_tasklets) >= 0, self
        assert min(self.forward_wait_s, self.backward_wait_s) >= 0.0, self

    def wait_after_s(self, pass_name: str, index: int, pass_tasklets: int) -> float | None:
        """The wait at the pause point after counted tasklet ``index``
        (0-based) of a pass of ``pass_tasklets``; None: no pause point there."""
        every, wait_s = ((self.forward_tasklets, self.forward_wait_s) if pass_name == FORWARD
                         else (self.backward_tasklets, self.backward_wait_s))
        assert 0 <= index < pass_tasklets, (index, pass_tasklets)
        if every <= 0 or ((index + 1) % every != 0 and index + 1 != pass_tasklets):
            return None
        return wait_s

    def points_per_pass(self, num_layers: int) -> tuple[int, int]:
        """Pause points per forward pass and per backward pass."""
        def count(every: int, n: int) -> int:
            return -(-n // every) if every > 0 else 0
        return (count(self.forward_tasklets, num_forward_tasklets(num_layers)),
                count(self.backward_tasklets, num_backward_tasklets(num_layers)))


@dataclass(frozen=True)
class ArrivalGate:
    """FineInfer's deferral gate: a request reaching an idle server waits
    ``defer_s`` (to batch more arrivals), then for the trainer's iteration in
    progress to end, polled every ``poll_s``; the trainer starts no iteration
    while requests are in flight, polling as often."""

    defer_s: float
    poll_s: float = 0.005  # FineInfer polls every 5 ms

    def __post_init__(self) -> None:
        assert self.defer_s >= 0.0 and self.poll_s >= 0.0, self


@dataclass(frozen=True)
class SharingPolicy:
    mps: bool  # the MPS control daemon runs (server and trainer share SMs)
    gpu_memory_utilization: float  # vLLM's --gpu-memory-utilization
    trainer_mps_active_thread_pct: int = 100  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, trainer only
    trainer_seq_len_tokens: int = SAMPLE_TOKENS  # tokens per training sample
    pause_plan: PausePlan = field(default_factory=PausePlan)  # where an iteration stops for inference
    arrival_gate: ArrivalGate | None = None  # the load generator's gate; None: requests go at once
    # False: the trainer holds its own copy of the base weights (a process of
    # its own, as every system here runs it); True: it trains on the server's.
    trainer_shares_server_weights: bool = False

    def __post_init__(self) -> None:
        assert 0.0 < self.gpu_memory_utilization <= 1.0, self.gpu_memory_utilization
        assert 1 <= self.trainer_mps_active_thread_pct <= 100, self.trainer_mps_active_thread_pct
        assert self.trainer_seq_len_tokens >= 1, self.trainer_seq_len_tokens

    def trainer_may_start(self, requests_in_flight: int) -> bool:
        """May the trainer begin an iteration now? Under an arrival gate,
        only while no request is in flight (so the two never overlap)."""
        return self.arrival_gate is None or requests_in_flight == 0

    @property
    def trainer_poll_s(self) -> float:
        """How often a trainer held back by the arrival gate looks again, s."""
        assert self.arrival_gate is not None, "only an arrival gate holds the trainer back"
        return self.arrival_gate.poll_s

    def pause_points(self, num_layers: int) -> tuple[int, int]:
        """Pause points per forward pass and per backward pass ((0, 0): none)."""
        return self.pause_plan.points_per_pass(num_layers)

    def trainer_alone(self) -> SharingPolicy:
        """The PEFT ceiling's policy: the same server (memory split, MPS),
        the trainer on full samples with every thread, never stopping."""
        return replace(self, trainer_mps_active_thread_pct=100, trainer_seq_len_tokens=SAMPLE_TOKENS,
                       pause_plan=PausePlan(), arrival_gate=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharingPolicy:
        gate = d.get("arrival_gate")
        return cls(**{**d, "pause_plan": PausePlan(**d.get("pause_plan", {})),
                      "arrival_gate": ArrivalGate(**gate) if gate is not None else None})
