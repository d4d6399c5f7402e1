"""Workloads: ShareGPT/BurstGPT loaders, synthetic stand-ins, arrivals."""

from autotune.workloads.spec import RequestSpec, Workload

__all__ = ["RequestSpec", "Workload"]
