"""Knobs and search spaces.

A system declares its knobs: name, type, unit, physical limits and the
artifact's example value. A search space (``search_spaces/<system>.toml``, or
the user's file) sets the range each knob is searched over, within those
limits.

Search-space file format, one table per knob::

    [mps_active_thread_pct]
    low = 10
    high = 100
    step = 5        # optional; ints default to 1
    log = false     # optional
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import optuna

from autotune.errors import UserError

KnobType = Literal["int", "float"]


@dataclass(frozen=True)
class Knob:
    name: str  # in the field's words, with its unit: "forward_wait_s"
    type: KnobType
    unit: str  # "%", "s", "tokens", "tasklets"
    default: float  # the artifact's example value; the study's first trial
    min_allowed: float  # physical limits: no search space may leave them
    max_allowed: float
    help: str = ""
    # The range searched; set from a search-space file.
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def with_range(self, low: float, high: float, step: float | None, log: bool) -> Knob:
        return replace(self, low=low, high=high, step=step, log=log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        assert self.low is not None and self.high is not None, f"{self.name} has no range"
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return optuna.distributions.FloatDistribution(
            self.low, self.high, step=self.step, log=self.log
        )

    def grid(self, max_points: int = 9, max_steps: int = 40) -> list[float]:
        """Points for grid search: every step of a discrete knob when there are
        at most ``max_steps``, else ``max_points`` spread (on the log scale if
        the knob has one) and snapped to the step."""
        assert self.low is not None and self.high is not None
        step = self.step or (1 if self.type == "int" else None)
        if step is not None:
            n = int(round((self.high - self.low) / step)) + 1
            if n <= max_steps:
                return [self._cast(self.low + i * step) for i in range(n)]
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            pts = [math.exp(lo + (hi - lo) * i / (max_points - 1)) for i in range(max_points)]
        else:
            pts = [self.low + (self.high - self.low) * i / (max_points - 1) for i in range(max_points)]
        if step is not None:
            pts = [self.low + round((p - self.low) / step) * step for p in pts]
        return sorted({self._cast(p) for p in pts})

    def _cast(self, value: float) -> float:
        return int(round(value)) if self.type == "int" else float(value)

    def range_record(self) -> dict[str, Any]:
        """The range searched, as data (how a study stores its search space)."""
        return {"type": self.type, "unit": self.unit, "low": self.low, "high": self.high, "step": self.step,
                "log": self.log, "default": self.default}

    def describe_range(self) -> str:
        scale = ", log" if self.log else ""
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.low:g}–{self.high:g} {self.unit}{step}{scale}"


@dataclass(frozen=True)
class SearchSpace:
    system: str
    knobs: tuple[Knob, ...]
    source: str  # where the ranges came from (a path, or "built-in")

    def __iter__(self):
        return iter(self.knobs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    def __getitem__(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise KeyError(name)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {k.name: k.distribution() for k in self.knobs}

    def defaults(self) -> dict[str, float]:
        """The artifact's example values, clipped into the searched range."""
        out: dict[str, float] = {}
        for k in self.knobs:
            assert k.low is not None and k.high is not None
            v = min(max(k.default, k.low), k.high)
            out[k.name] = int(v) if k.type == "int" else float(v)
        return out

    def grid(self, max_points: int = 9) -> dict[str, list[float]]:
        return {k.name: k.grid(max_points) for k in self.knobs}


def _number(table: Mapping[str, Any], key: str, where: str) -> float | None:
    if key not in table:
        return None
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where}: '{key}' must be a number, got {v!r}")
    if not math.isfinite(v):
        raise UserError(f"{where}: '{key}' must be finite, got {v!r}")
    return float(v)


def apply_ranges(system: str, knobs: tuple[Knob, ...], doc: Mapping[str, Any], source: str) -> SearchSpace:
    """Check a parsed search-space document against the system's knobs."""
    by_name = {k.name: k for k in knobs}
    unknown = sorted(set(doc) - set(by_name))
    if unknown:
        raise UserError(
            f"{source}: unknown knob(s) {', '.join(unknown)} for {system}; "
            f"its knobs are {', '.join(by_name)}"
        )
    out = []
    for knob in knobs:
        if knob.name not in doc:
            raise UserError(f"{source}: no range for knob '{knob.name}' of {system}")
        table = doc[knob.name]
        where = f"{source} [{knob.name}]"
        if not isinstance(table, Mapping):
            raise UserError(f"{where}: expected a table with low/high, got {table!r}")
        extra = sorted(set(table) - {"low", "high", "step", "log"})
        if extra:
            raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; use low, high, step, log")
        low, high = _number(table, "low", where), _number(table, "high", where)
        if low is None or high is None:
            raise UserError(f"{where}: needs both 'low' and 'high'")
        step = _number(table, "step", where)
        log = table.get("log", False)
        if not isinstance(log, bool):
            raise UserError(f"{where}: 'log' must be true or false, got {log!r}")
        if low > high:
            raise UserError(f"{where}: low {low:g} is above high {high:g}")
        if low < knob.min_allowed or high > knob.max_allowed:
            raise UserError(
                f"{where}: range {low:g}–{high:g} leaves the physical limits "
                f"{knob.min_allowed:g}–{knob.max_allowed:g} {knob.unit}"
            )
        if knob.type == "int" and (low != int(low) or high != int(high) or (step is not None and step != int(step))):
            raise UserError(f"{where}: {knob.name} is an integer knob; low, high and step must be integers")
        if step is not None and step <= 0:
            raise UserError(f"{where}: step must be positive, got {step:g}")
        if log and low <= 0:
            raise UserError(f"{where}: a log-scale range must start above 0, got low {low:g}")
        if log and step is not None and step != 1:
            raise UserError(f"{where}: a log-scale range cannot have a step")
        if step is not None and abs((high - low) / step - round((high - low) / step)) > 1e-9:
            raise UserError(f"{where}: high - low ({high - low:g}) is not a multiple of step {step:g}")
        if knob.type == "int" and step is None:
            step = 1.0
        out.append(knob.with_range(low, high, step if not log else None, log))
    return SearchSpace(system=system, knobs=tuple(out), source=source)


def load_search_space(system: str, knobs: tuple[Knob, ...], path: Path | None = None) -> SearchSpace:
    """The system's search space: the user's file, or the one shipped with it."""
    if path is None:
        ref = resources.files("autotune.search_spaces") / f"{system.replace('-', '_')}.toml"
        text, source = ref.read_text(encoding="utf-8"), f"search_spaces/{ref.name}"
    else:
        try:
            text, source = Path(path).read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise UserError(f"cannot read search-space file {path}: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed search-space file {source}: {e}") from None
    return apply_ranges(system, knobs, doc, source)
