"""Chunked fine-tuning: the trainer runs beside the server under MPS on
shorter sequences (the artifact's lossy version: max_seq_len = chunk)."""

from __future__ import annotations

from collections.abc import Mapping

from autotune.knobs import Knob
from autotune.policy import SharingPolicy
from autotune.systems._base import System


class Chunked(System):
    name = "chunked"
    title = "Chunked fine-tuning"
    description = "torchtune LoRA on chunks of each sample beside the vLLM server under MPS"
    gpu_memory_utilization = 0.45
    knobs = (
        Knob(
            "chunk_size_tokens", "int", "tokens", default=128, min_allowed=1, max_allowed=2048,
            help="fine-tuning sequence length (the artifact trains on max_seq_len = chunk)",
        ),
    )

    def policy(self, params: Mapping[str, float]) -> SharingPolicy:
        return SharingPolicy(
            mps=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            trainer_seq_len_tokens=int(params["chunk_size_tokens"]),
        )
