"""The plug-in point for running trials: ``sim`` (embedded) and ``gpu`` (real)."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

from autotune.trial import TrialResult, TrialSpec

#: progress(fraction_done in [0, 1], short status text)
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, status: str) -> None:
    """A ``ProgressFn`` that ignores what it is told."""


class Backend(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        """Run one trial and measure it.

        A trial that cannot produce measurements (out of memory, server died)
        returns ``TrialResult.crash(reason)``; it does not raise. Exceptions
        are for bugs and for the user's Ctrl-C.
        """

    def describe(self) -> dict[str, Any]:
        """Hardware and cost model, for results files: {"hardware": ..., ...}."""
        return {"backend": self.name}

    @property
    def hardware(self) -> str:
        """Name of the hardware profile the figures' rates are chosen for."""
        return "h100-80gb"

    def headline(self) -> str:
        """One line for the user: the machine the trials run on, and how real it is."""
        return self.hardware

    def identity(self) -> dict[str, Any]:
        """What of the backend changes a measurement (part of a study's identity)."""
        return {"hardware": self.hardware}

    def cache_key(self) -> str:
        """What reference runs are cached under (GPU model, cost profile)."""
        return self.hardware

    def close(self) -> None:
        """Release servers, daemons and files. Called once, also on errors."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
