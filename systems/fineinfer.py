"""FineInfer: temporal sharing by deferred continuous batching.

A new prefill arriving at an idle engine waits ``defer_s`` to batch more
arrivals, then for the fine-tuning iteration in progress to end (polled every
5 ms). Fine-tuning runs whole iterations only while no request is pending.
"""

from __future__ import annotations

from collections.abc import Mapping

from autotune.knobs import Knob
from autotune.policy import ArrivalGate, SharingPolicy
from autotune.systems._base import System


class FineInfer(System):
    name = "fineinfer"
    title = "FineInfer"
    description = "deferred continuous batching: fine-tuning iterations fill the gaps between requests"
    gpu_memory_utilization = 0.75
    prompts_per_rate = 400
    knobs = (
        Knob(
            "defer_s", "float", "s", default=0.1, min_allowed=0.0, max_allowed=60.0,
            help="seconds a new prefill waits at an idle engine before it is served",
        ),
    )

    def policy(self, params: Mapping[str, float]) -> SharingPolicy:
        return SharingPolicy(
            mps=False,
            gpu_memory_utilization=self.gpu_memory_utilization,
            arrival_gate=ArrivalGate(defer_s=float(params["defer_s"])),
        )
