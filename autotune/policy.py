"""Sharing policies: what a system's knobs mean to the parts that run a trial.

The four systems are four policies over the same parts (a vLLM-style server,
one LoRA trainer whose step runs as tasklets, a load generator, and a channel
between them). Both backends, ``sim`` and ``gpu``, read a ``SharingPolicy``
and nothing else of the system that made it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

#: Tokens in one PEFT sample; throughput is reported in samples of this length.
SAMPLE_TOKENS = 512


class Preemption(str, enum.Enum):
    """Where the trainer may stop for inference."""

    NONE = "none"  # runs freely beside the server (spatial sharing)
    ITERATION = "iteration"  # between whole training iterations (FineInfer)
    TASKLET = "tasklet"  # between tasklets, every N of them (LLMStation)


@dataclass(frozen=True)
class SharingPolicy:
    mps: bool  # the MPS control daemon runs (server and trainer share SMs)
    gpu_memory_utilization: float  # vLLM's --gpu-memory-utilization
    trainer_mps_active_thread_pct: int = 100  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, trainer only
    trainer_seq_len_tokens: int = SAMPLE_TOKENS  # tokens per training sample
    preemption: Preemption = Preemption.NONE
    # Preemption.TASKLET: after every N tasklets of a pass, if requests are in
    # flight, the trainer sleeps that pass's wait.
    forward_tasklets: int = 0
    forward_wait_s: float = 0.0
    backward_tasklets: int = 0
    backward_wait_s: float = 0.0
    # Preemption.ITERATION: a request arriving at an idle server waits
    # ``defer_s`` (to batch more arrivals), then for the trainer's iteration in
    # progress to end; no iteration starts while requests are in flight.
    defer_s: float = 0.0
    # FineInfer polls the trainer every 5 ms while it waits for the iteration.
    iteration_poll_s: float = 0.005

    def __post_init__(self) -> None:
        assert 0.0 < self.gpu_memory_utilization <= 1.0, self.gpu_memory_utilization
        assert 1 <= self.trainer_mps_active_thread_pct <= 100, self.trainer_mps_active_thread_pct
        assert self.trainer_seq_len_tokens >= 1, self.trainer_seq_len_tokens
        assert min(self.forward_wait_s, self.backward_wait_s, self.defer_s) >= 0.0
        if self.preemption is Preemption.TASKLET:
            assert self.forward_tasklets >= 1 and self.backward_tasklets >= 1, (
                "tasklet preemption needs forward_tasklets and backward_tasklets >= 1"
            )

    def pause_points(self, num_layers: int) -> tuple[int, int]:
        """Pause points per forward pass and per backward pass (0, 0 without
        tasklet preemption). One falls after every N counted tasklets of a
        pass and at its end: the forward pass counts ``num_layers + 1``
        tasklets (the layers and the head; the embeddings go with the first
        layer), the backward pass ``num_layers``; so ceil(n / N) each."""
        if self.preemption is not Preemption.TASKLET:
            return 0, 0
        return -(-(num_layers + 1) // self.forward_tasklets), -(-num_layers // self.backward_tasklets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preemption"] = self.preemption.value
        return d
