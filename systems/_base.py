"""The plug-in point for a way of sharing the GPU.

A system declares its knobs and turns knob values into a ``SharingPolicy``.
Everything that runs a trial reads the policy, never the system.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from autotune.knobs import Knob, SearchSpace, load_search_space
from autotune.policy import SharingPolicy


class System(abc.ABC):
    name: ClassVar[str]  # CLI name: "llmstation"
    title: ClassVar[str]  # for tables: "LLMStation"
    description: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]]
    gpu_memory_utilization: ClassVar[float]  # vLLM's, as the artifact sets it
    prompts_per_rate: ClassVar[int] = 200  # prompts = this x rate (req/s) for fig8a/fig9a

    @abc.abstractmethod
    def policy(self, params: Mapping[str, float]) -> SharingPolicy:
        """The sharing policy these knob values give."""

    def search_space(self, path: Path | None = None) -> SearchSpace:
        return load_search_space(self.name, self.knobs, path)

    def default_params(self) -> dict[str, float]:
        return {k.name: k.default for k in self.knobs}
