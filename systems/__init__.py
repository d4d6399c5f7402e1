"""The registry of GPU-sharing systems (installed as ``autotune.systems``)."""

from __future__ import annotations

from autotune.errors import UserError
from autotune.systems._base import System
from autotune.systems.chunked import Chunked
from autotune.systems.fineinfer import FineInfer
from autotune.systems.llmstation import LLMStation
from autotune.systems.vllm_torchtune import VllmTorchtune

SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (VllmTorchtune, FineInfer, Chunked, LLMStation)
}


def get_system(name: str) -> System:
    try:
        return SYSTEMS[name]()
    except KeyError:
        raise UserError(f"unknown system {name!r}; choose one of: {', '.join(SYSTEMS)}") from None


__all__ = ["SYSTEMS", "System", "get_system"]
