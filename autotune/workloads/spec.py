"""What a trial replays: one frozen spec per request."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float  # send time, s after the first request (first is at 0)
    prompt_len: int  # tokens
    output_len: int  # tokens to generate (max_tokens, EOS ignored)
    adapter: int | None = None  # LoRA adapter index 0..7, None for the base model


@dataclass(frozen=True)
class Workload:
    requests: tuple[RequestSpec, ...]
    rate_req_s: float  # the mean arrival rate asked for
    seed: int
    synthetic: bool  # True when generators stood in for ShareGPT/BurstGPT files
    description: str  # one line: datasets, arrivals, approximations

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Time from the first arrival to the last."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def truncated(self, window_s: float) -> Workload:
        """Only the requests that arrive within the first ``window_s`` seconds."""
        kept = tuple(r for r in self.requests if r.arrival_s < window_s)
        return Workload(kept, self.rate_req_s, self.seed, self.synthetic,
                        f"{self.description}; first {window_s:g} s")

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.requests:
                f.write(json.dumps(asdict(r)) + "\n")
