"""Figures of the LLMStation paper as workload presets.

Rates: the artifact's were chosen for 2 GPUs of 24 GB (``2x-rtx3090``, the
simulator's default). On an H100 80GB they leave the GPU mostly idle
(measured: fine-tuning beside serving at 2 req/s costs serving only +15%
TPOT), so each preset carries a rate per hardware profile; hardware with no
rate of its own gets the artifact's, and the output says which one it used.
The artifact gives no rates for Figures 8 and 9: on ``2x-rtx3090`` they are
where the simulator shows the knobs binding under the paper's SLOs (fig8a:
LLMStation's pause settings decide feasibility at 6 req/s, below which every
setting meets the SLO; fig9a's bursts reach that edge at 3 req/s); fig10 and
fig13 keep the paper's 0.88 req/s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from autotune.errors import UserError

Arrivals = Literal["poisson", "burstgpt", "none"]

#: Hardware profiles the rates are chosen for.
ARTIFACT_HARDWARE = "2x-rtx3090"  # the artifact: 2 GPUs of 24 GB, tensor parallel 2
H100 = "h100-80gb"
H200 = "h200"
H200_DATASHEET = "h200-datasheet"  # the same machine, profiled from its datasheet


@dataclass(frozen=True)
class FigurePreset:
    name: str
    description: str
    arrivals: Arrivals
    rates_req_s: Mapping[str, float] = field(default_factory=dict)  # hardware -> default rate
    num_prompts: int | None = None  # fixed count; None: the system's prompts_per_rate x rate
    lora_adapters: bool = False  # 8 LoRA adapters served (fig13)
    systems: tuple[str, ...] | None = None  # None: all systems
    model: str = "llama-3.1-8b"
    pareto: bool = False  # the figure is a trade-off curve

    @property
    def serves(self) -> bool:
        return self.arrivals != "none"

    def default_rate(self, hardware: str) -> tuple[float, str]:
        """(rate, hardware profile it was chosen for); falls back to the artifact's."""
        if not self.serves:
            return 0.0, hardware
        if hardware in self.rates_req_s:
            return self.rates_req_s[hardware], hardware
        return self.rates_req_s[ARTIFACT_HARDWARE], ARTIFACT_HARDWARE

    def prompts(self, rate_req_s: float, prompts_per_rate: int) -> int:
        if not self.serves:
            return 0
        if self.num_prompts is not None:
            return self.num_prompts
        return max(1, round(prompts_per_rate * rate_req_s))


FIGURES: dict[str, FigurePreset] = {
    f.name: f
    for f in (
        FigurePreset(
            "fig8a", "ShareGPT prompts, Poisson arrivals; max PEFT throughput under SLO per rate",
            arrivals="poisson", rates_req_s={ARTIFACT_HARDWARE: 6.0, H100: 12.0, H200: 24.0, H200_DATASHEET: 24.0},
        ),
        FigurePreset(
            "fig9a", "ShareGPT prompts, BurstGPT arrival gaps rescaled to the rate",
            arrivals="burstgpt", rates_req_s={ARTIFACT_HARDWARE: 3.0, H100: 12.0, H200: 24.0, H200_DATASHEET: 24.0},
        ),
        FigurePreset(
            "fig10", "BurstGPT arrivals at 0.88 req/s, 200 prompts; latency vs PEFT-throughput trade-off",
            arrivals="burstgpt", rates_req_s={ARTIFACT_HARDWARE: 0.88, H100: 10.0, H200: 20.0, H200_DATASHEET: 20.0},
            num_prompts=200, pareto=True,
        ),
        FigurePreset(
            "fig12", "LLMStation only, no serving; PEFT throughput vs pause points per pass",
            arrivals="none", systems=("llmstation",),
        ),
        FigurePreset(
            "fig13", "as fig10 with 8 LoRA adapters served (uniform, skewed or none), rank 8/16/32",
            arrivals="burstgpt", rates_req_s={ARTIFACT_HARDWARE: 0.88, H100: 10.0, H200: 20.0, H200_DATASHEET: 20.0},
            num_prompts=200, lora_adapters=True,
        ),
    )
}

LORA_DISTS = ("uniform", "skewed", "none")
LORA_RANKS = (8, 16, 32)


def get_figure(name: str) -> FigurePreset:
    try:
        return FIGURES[name]
    except KeyError:
        raise UserError(f"unknown figure {name!r}; choose one of: {', '.join(FIGURES)}") from None
