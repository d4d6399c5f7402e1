"""Backends run trials. ``sim`` is embedded; ``gpu`` needs ``pip install autotune[gpu]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autotune.backends._base import Backend, ProgressFn, no_progress
from autotune.errors import UserError


def _sim(**options: Any) -> Backend:
    from autotune.sim.backend import SimBackend

    return SimBackend(**options)


def _gpu(**options: Any) -> Backend:
    from autotune.gpu.backend import GpuBackend

    return GpuBackend(**options)


BACKENDS: dict[str, Callable[..., Backend]] = {"sim": _sim, "gpu": _gpu}


def make_backend(name: str, **options: Any) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None
    return factory(**options)


__all__ = ["BACKENDS", "Backend", "ProgressFn", "make_backend", "no_progress"]
