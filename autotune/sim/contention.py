"""How the server and the trainer slow each other down when both run at once.

Under NVIDIA MPS, kernels of both processes run on the GPU at the same time.
Each side is described by its *GPU duty*: the fraction of wall time its
kernels are on the GPU (the trainer is launch-bound at batch 1, so its duty
is well below 1; the server's is the GPU share of its iteration). While the
other side has a kernel running, a side loses a fraction of its speed that
depends on the kind of its work (measured on an H100, see the profile):

- memory-bound work (decode: streaming the weights) loses
  ``memory_bound_loss x share ** memory_bound_loss_exponent``, where share is
  the other side's speed share (the trainer's from its active-thread %):
  a full-GPU GEMM loop beside it takes most of the SMs that issue its loads;
- compute-bound work (prefill GEMMs, the trainer's GEMMs) loses
  ``compute_bound_loss``: the SMs are split block by block.

A side whose work runs a fraction f of the time beside the other's kernels
(f = the other's duty) then runs at (1 - f) + f (1 - loss) of its speed:
its time stretches by 1 / (1 - f x loss).

The trainer's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` p caps its own speed at
``p ** thread_pct_speed_exponent`` of the GPU (measured: 25% -> 31%), and its
host (CPU) time grows by ``trainer_host_slowdown`` while the server is busy.
Without MPS the contexts time-slice: each loses ``timeslice_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.sim.profile import Mps


@dataclass(frozen=True)
class Contention:
    params: Mps
    mps_on: bool
    trainer_thread_fraction: float  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100 (only under MPS)

    @property
    def trainer_speed(self) -> float:
        """The trainer's GPU speed alone, as a fraction of the whole GPU's."""
        if not self.mps_on:
            return 1.0
        return self.trainer_thread_fraction ** self.params.thread_pct_speed_exponent

    def _memory_loss(self, other_share: float) -> float:
        return self.params.memory_bound_loss * other_share ** self.params.memory_bound_loss_exponent

    def server_stretch(self, trainer_duty: float) -> tuple[float, float]:
        """(memory-time factor, compute-time factor) of a server iteration."""
        if not self.mps_on:
            f = 1.0 / (1.0 - trainer_duty * self.params.timeslice_loss)
            return f, f
        mem = 1.0 / (1.0 - trainer_duty * self._memory_loss(self.trainer_speed))
        comp = 1.0 / (1.0 - trainer_duty * self.params.compute_bound_loss)
        return mem, comp

    def trainer_gpu_stretch(self, server_duty: float, trainer_compute_share: float) -> float:
        """Factor on the trainer's GPU time (at its own speed share)."""
        if not self.mps_on:
            return 1.0 / (1.0 - server_duty * self.params.timeslice_loss)
        loss = (self.params.compute_bound_loss * trainer_compute_share
                + self._memory_loss(1.0) * (1.0 - trainer_compute_share))
        return 1.0 / (1.0 - server_duty * loss)

    def trainer_host_stretch(self, server_busy: bool) -> float:
        return 1.0 + self.params.trainer_host_slowdown if server_busy else 1.0
