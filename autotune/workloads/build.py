"""From workload options (a figure's preset plus the user's files) to a Workload."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from autotune.errors import UserError
from autotune.workloads.arrivals import check_count, check_rate, gamma_arrivals, poisson_arrivals
from autotune.workloads.burstgpt import burstgpt_arrivals
from autotune.workloads.sharegpt import APPROXIMATION, load_sharegpt
from autotune.workloads.spec import RequestSpec, Workload
from autotune.workloads.synthetic import (
    ANSWER_LOGNORMAL,
    BURSTGPT_LIKE_BURSTINESS,
    PROMPT_LOGNORMAL,
    synthetic_burstgpt_arrivals,
    synthetic_sharegpt_lengths,
)

ARRIVALS = ("poisson", "burstgpt", "gamma")
LORA_DISTS = ("uniform", "skewed", "none")
_ADAPTERS_TEXT = {"uniform": "adapters uniform (i mod {n})", "skewed": "adapters skewed (i mod 2 of {n})",
                  "none": "adapters none (base model)"}


@dataclass(frozen=True)
class WorkloadOptions:
    arrivals: Literal["poisson", "burstgpt", "gamma"]  # the figure's arrival process
    rate_req_s: float  # mean arrival rate
    num_prompts: int
    seed: int = 0
    burstiness: float = 1.0  # gamma shape, for "gamma" (1 = Poisson)
    sharegpt_path: Path | None = None  # None: synthetic ShareGPT-like lengths
    burstgpt_path: Path | None = None  # None: synthetic bursty gaps (for "burstgpt")
    tokenizer_path: Path | None = None  # None: approximate ShareGPT token counts
    lora_dist: Literal["uniform", "skewed", "none"] | None = None  # fig13; None: no adapters
    num_adapters: int = 8


def _validate(opts: WorkloadOptions) -> None:
    if opts.arrivals not in ARRIVALS:
        raise UserError(f"unknown arrival process {opts.arrivals!r}; choose one of {', '.join(ARRIVALS)}")
    check_rate(opts.rate_req_s)
    check_count(opts.num_prompts)
    if not isinstance(opts.seed, int) or isinstance(opts.seed, bool) or opts.seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {opts.seed!r}")
    if not (isinstance(opts.burstiness, (int, float)) and math.isfinite(opts.burstiness) and opts.burstiness > 0):
        raise UserError(f"burstiness must be a finite number > 0 (1 = Poisson), got {opts.burstiness!r}")
    if opts.lora_dist is not None and opts.lora_dist not in LORA_DISTS:
        raise UserError(f"unknown LoRA distribution {opts.lora_dist!r}; choose one of {', '.join(LORA_DISTS)}")
    min_adapters = 2 if opts.lora_dist == "skewed" else 1
    if opts.lora_dist is not None and (not isinstance(opts.num_adapters, int) or opts.num_adapters < min_adapters):
        raise UserError(f"LoRA distribution {opts.lora_dist} needs >= {min_adapters} adapters, "
                        f"got {opts.num_adapters!r}")


def _lengths(opts: WorkloadOptions) -> tuple[list[tuple[int, int]], str]:
    """(prompt_len, output_len) pairs [num_prompts] in tokens, and their description."""
    n = opts.num_prompts
    if opts.sharegpt_path is None:
        mu_p, sigma_p = PROMPT_LOGNORMAL
        mu_a, sigma_a = ANSWER_LOGNORMAL
        return (synthetic_sharegpt_lengths(n, opts.seed),
                f"synthetic ShareGPT-like lengths (lognormal prompt mu {mu_p:g} sigma {sigma_p:g}, "
                f"answer mu {mu_a:g} sigma {sigma_a:g}; no ShareGPT file)")
    pairs = load_sharegpt(opts.sharegpt_path, n, opts.seed, opts.tokenizer_path)
    text = f"ShareGPT prompts from {Path(opts.sharegpt_path).name} (vLLM's filters, seed {opts.seed})"
    if len(pairs) < n:
        # As vLLM does when a dataset is short: draw the rest with replacement.
        text += f", {len(pairs)} usable, oversampled to {n}"
        pairs = pairs + random.Random(opts.seed).choices(pairs, k=n - len(pairs))
    if opts.tokenizer_path is None:
        text += f"; {APPROXIMATION}"
    else:
        text += f"; token counts from {opts.tokenizer_path}"
    return pairs, text


def _arrivals(opts: WorkloadOptions) -> tuple[np.ndarray, str, bool]:
    """Send times [num_prompts] in s, their description, and whether synthetic."""
    n, rate = opts.num_prompts, opts.rate_req_s
    if opts.arrivals == "poisson":
        return poisson_arrivals(n, rate, opts.seed), f"Poisson arrivals at {rate:g} req/s", False
    if opts.arrivals == "gamma":
        return (gamma_arrivals(n, rate, opts.burstiness, opts.seed),
                f"gamma arrivals at {rate:g} req/s, burstiness {opts.burstiness:g}", False)
    if opts.burstgpt_path is None:
        return (synthetic_burstgpt_arrivals(n, rate, opts.seed),
                f"synthetic BurstGPT-like arrivals (gamma gaps, burstiness {BURSTGPT_LIKE_BURSTINESS:g}; "
                f"no BurstGPT file) at {rate:g} req/s", True)
    return (burstgpt_arrivals(opts.burstgpt_path, n, rate),
            f"BurstGPT arrival gaps from {Path(opts.burstgpt_path).name} rescaled to {rate:g} req/s", False)


def _adapter(i: int, opts: WorkloadOptions) -> int | None:
    if opts.lora_dist == "uniform":
        return i % opts.num_adapters
    if opts.lora_dist == "skewed":
        return i % 2
    return None  # "none" (base model) or no adapters


def build_workload(opts: WorkloadOptions) -> Workload:
    """The requests of one trial. Same options, same workload."""
    _validate(opts)
    pairs, lengths_text = _lengths(opts)
    arrivals_s, arrivals_text, arrivals_synthetic = _arrivals(opts)
    requests = tuple(
        RequestSpec(float(t), int(p), int(o), _adapter(i, opts))
        for i, (t, (p, o)) in enumerate(zip(arrivals_s, pairs, strict=True))
    )
    parts = [f"{opts.num_prompts} requests", lengths_text, arrivals_text]
    if opts.lora_dist is not None:
        parts.append(_ADAPTERS_TEXT[opts.lora_dist].format(n=opts.num_adapters))
    synthetic = opts.sharegpt_path is None or arrivals_synthetic
    return Workload(requests, float(opts.rate_req_s), opts.seed, synthetic, "; ".join(parts))
