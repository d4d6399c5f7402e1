"""LLMStation: spatial-temporal sharing with preemptible fine-tuning.

The forward pass yields once per decoder layer (plus head), the backward pass
about once per layer. After every ``forward_tasklets`` tasklets, if inference
work is pending, fine-tuning sleeps ``forward_wait_s``; likewise backward.
Otherwise both run at once under MPS.
"""

from __future__ import annotations

from collections.abc import Mapping

from autotune.knobs import Knob
from autotune.policy import PausePlan, SharingPolicy
from autotune.systems._base import System


class LLMStation(System):
    name = "llmstation"
    title = "LLMStation"
    description = "fine-tuning as tasklets that pause for inference every N tasklets"
    gpu_memory_utilization = 0.75
    knobs = (
        Knob("forward_tasklets", "int", "tasklets", default=8, min_allowed=1, max_allowed=1024,
             help="forward tasklets between pause points"),
        Knob("forward_wait_s", "float", "s", default=0.005, min_allowed=0.0, max_allowed=10.0,
             help="sleep at a forward pause point while requests are in flight"),
        Knob("backward_tasklets", "int", "tasklets", default=8, min_allowed=1, max_allowed=1024,
             help="backward tasklets between pause points"),
        Knob("backward_wait_s", "float", "s", default=0.005, min_allowed=0.0, max_allowed=10.0,
             help="sleep at a backward pause point while requests are in flight"),
    )

    def policy(self, params: Mapping[str, float]) -> SharingPolicy:
        return SharingPolicy(
            mps=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            pause_plan=PausePlan(
                forward_tasklets=int(params["forward_tasklets"]),
                forward_wait_s=float(params["forward_wait_s"]),
                backward_tasklets=int(params["backward_tasklets"]),
                backward_wait_s=float(params["backward_wait_s"]),
            ),
        )
