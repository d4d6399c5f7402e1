"""Workloads: ShareGPT/BurstGPT loaders, synthetic stand-ins, arrivals."""

from autotune.workloads.arrivals import gamma_arrivals, poisson_arrivals, rescale_gaps
from autotune.workloads.build import WorkloadOptions, build_workload
from autotune.workloads.burstgpt import burstgpt_arrivals, load_burstgpt_timestamps
from autotune.workloads.sharegpt import approx_token_count, load_sharegpt
from autotune.workloads.spec import RequestSpec, Workload
from autotune.workloads.synthetic import synthetic_burstgpt_arrivals, synthetic_sharegpt_lengths

__all__ = [
    "RequestSpec",
    "Workload",
    "WorkloadOptions",
    "approx_token_count",
    "build_workload",
    "burstgpt_arrivals",
    "gamma_arrivals",
    "load_burstgpt_timestamps",
    "load_sharegpt",
    "poisson_arrivals",
    "rescale_gaps",
    "synthetic_burstgpt_arrivals",
    "synthetic_sharegpt_lengths",
]
