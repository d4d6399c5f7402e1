"""Stand-ins for the ShareGPT and BurstGPT files when they are absent.

They match the few statistics DESIGN.md gives, not the datasets in full:
- lengths: prompt and answer lengths are independent lognormals, rounded to
  tokens, then vLLM's filter (both >= 4, prompt <= 1024, prompt + answer <=
  2048; a rejected pair is redrawn). The parameters below make the filtered
  means 215 (prompt) and 198 (answer) tokens, ShareGPT's with the Llama-3
  tokenizer and seed 0; medians come out near 135 and 130 tokens, standard
  deviations near 215 and 210 (heavy right tails up to the limits). The real
  lengths are correlated and multi-modal; these are not.
- arrivals: gamma gaps with burstiness 0.5 (coefficient of variation of the
  gaps sqrt(2) ~ 1.41, against 1 for Poisson), mean rate R, first at t = 0.
  BurstGPT's ChatGPT gaps are burstier than Poisson; this shape is a stand-in
  chosen for that, not fitted to the trace.
Each generator owns a numpy Generator seeded with (seed, its stream).
"""

from __future__ import annotations

import numpy as np

from autotune.workloads.arrivals import check_count, gamma_arrivals
from autotune.workloads.sharegpt import MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS, MIN_TOKENS

PROMPT_LOGNORMAL = (5.020, 1.30)  # (mu, sigma) of ln(prompt tokens)
ANSWER_LOGNORMAL = (4.868, 0.95)  # (mu, sigma) of ln(answer tokens)
BURSTGPT_LIKE_BURSTINESS = 0.5  # gamma shape of the stand-in arrival gaps

_LENGTHS_STREAM = 2
_BLOCK = 1024  # pairs drawn at a time (~93% are kept)


def synthetic_sharegpt_lengths(num_requests: int, seed: int = 0) -> list[tuple[int, int]]:
    """``num_requests`` ShareGPT-like (prompt_len, output_len) pairs in tokens."""
    check_count(num_requests)
    rng = np.random.default_rng((seed, _LENGTHS_STREAM))
    mu = np.array([PROMPT_LOGNORMAL[0], ANSWER_LOGNORMAL[0]])
    sigma = np.array([PROMPT_LOGNORMAL[1], ANSWER_LOGNORMAL[1]])
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_requests:
        # Fixed blocks, so that the first k pairs do not depend on num_requests.
        tokens = np.rint(np.exp(mu + sigma * rng.standard_normal((_BLOCK, 2)))).astype(np.int64)  # [B, 2]
        prompt, answer = tokens[:, 0], tokens[:, 1]
        keep = ((prompt >= MIN_TOKENS) & (answer >= MIN_TOKENS) & (prompt <= MAX_PROMPT_TOKENS)
                & (prompt + answer <= MAX_TOTAL_TOKENS))
        pairs.extend(zip(prompt[keep].tolist(), answer[keep].tolist()))
    return pairs[:num_requests]


def synthetic_burstgpt_arrivals(num_requests: int, rate_req_s: float, seed: int = 0) -> np.ndarray:
    """Send times [num_requests] in s, bursty gamma gaps of mean 1/rate, first at 0."""
    return gamma_arrivals(num_requests, rate_req_s, BURSTGPT_LIKE_BURSTINESS, seed)
