"""vLLM + torchtune under NVIDIA MPS: spatial sharing, the trainer capped by
its MPS active-thread percentage."""

from __future__ import annotations

from collections.abc import Mapping

from autotune.knobs import Knob
from autotune.policy import SharingPolicy
from autotune.systems._base import System


class VllmTorchtune(System):
    name = "vllm-torchtune"
    title = "vLLM + torchtune (MPS)"
    description = "vLLM server and a torchtune LoRA job side by side under MPS; the trainer's SM share is capped"
    gpu_memory_utilization = 0.45
    knobs = (
        Knob(
            "mps_active_thread_pct", "int", "%", default=80, min_allowed=1, max_allowed=100,
            help="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the fine-tuning process only",
        ),
    )

    def policy(self, params: Mapping[str, float]) -> SharingPolicy:
        return SharingPolicy(
            mps=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            trainer_mps_active_thread_pct=int(params["mps_active_thread_pct"]),
        )
