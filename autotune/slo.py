"""Service-level objectives on P99 TTFT and P99 TPOT, and the constraint
margins every finished trial carries (<= 0 means met)."""

from __future__ import annotations

from dataclasses import dataclass

from autotune.errors import UserError
from autotune.models import ModelConfig
from autotune.trial import TrialResult

#: Constraint value of a trial that produced no measurement: far beyond any limit.
CRASH_VIOLATION = 10.0
CONSTRAINT_KEYS = ("ttft_p99", "tpot_p99")


#: The paper's SLOs (P99 TTFT <= 500 ms; P99 TPOT <= 50 ms for the 8B model, 80 ms for the
#: larger ones), as a third-party summary of the paper reports them; the artifact gives none.
PAPER_TTFT_P99_MS = 500.0
PAPER_TPOT_P99_MS = {"8b": 50.0, "larger": 80.0}
PAPER_SLO_SOURCE = "the paper's SLO as a third-party summary reports it"
#: Models above this many parameters get the larger models' TPOT limit.
PAPER_SMALL_MODEL_PARAMS = 10e9


def paper_slo(model: ModelConfig) -> tuple[float, float]:
    """(P99 TTFT ms, P99 TPOT ms) the paper holds a model of this size to."""
    small = model.num_params <= PAPER_SMALL_MODEL_PARAMS
    return PAPER_TTFT_P99_MS, PAPER_TPOT_P99_MS["8b" if small else "larger"]


@dataclass(frozen=True)
class SloSpec:
    """Limits as given, per metric: absolute (ms), relative to serving alone
    (a ratio), or neither: the paper's absolute limit for the model."""

    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    ttft_ratio: float | None = None  # x the serving-alone P99
    tpot_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_p99_ms", "tpot_p99_ms", "ttft_ratio", "tpot_ratio"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UserError(f"SLO {name} must be positive, got {v:g}")
        for metric in ("ttft", "tpot"):
            if getattr(self, f"{metric}_p99_ms") is not None and getattr(self, f"{metric}_ratio") is not None:
                raise UserError(f"give --slo-{metric}-ms or --slo-{metric}-ratio, not both")

    @property
    def needs_reference(self) -> bool:
        return self.ttft_ratio is not None or self.tpot_ratio is not None


@dataclass(frozen=True)
class ResolvedSlo:
    ttft_p99_ms: float
    tpot_p99_ms: float
    ttft_basis: str  # "absolute", "2x serving-alone P99 (31.2 ms)" or the paper's
    tpot_basis: str

    def to_dict(self) -> dict[str, float | str]:
        return {
            "ttft_p99_ms": self.ttft_p99_ms,
            "tpot_p99_ms": self.tpot_p99_ms,
            "ttft_basis": self.ttft_basis,
            "tpot_basis": self.tpot_basis,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ResolvedSlo:
        return cls(float(d["ttft_p99_ms"]), float(d["tpot_p99_ms"]), str(d["ttft_basis"]), str(d["tpot_basis"]))


def resolve(spec: SloSpec, reference: TrialResult | None, model: ModelConfig) -> ResolvedSlo:
    """Absolute limits stand; relative ones multiply the reference's P99; a
    metric with neither gets the paper's limit for the model."""
    paper = dict(zip(("ttft", "tpot"), paper_slo(model)))

    def one(absolute: float | None, ratio: float | None, metric: str) -> tuple[float, str]:
        if absolute is not None:
            return absolute, "absolute"
        if ratio is None:
            return paper[metric], PAPER_SLO_SOURCE
        if reference is None or reference.serving is None or reference.serving.completed == 0:
            why = reference.error if reference is not None and reference.error else "no requests completed"
            raise UserError(f"cannot set a relative {metric} SLO: the serving-alone reference run failed ({why})")
        ref_ms = getattr(reference.serving, metric).p99_ms
        return ratio * ref_ms, f"{ratio:g}x serving-alone P99 ({ref_ms:.2f} ms)"

    ttft, ttft_basis = one(spec.ttft_p99_ms, spec.ttft_ratio, "ttft")
    tpot, tpot_basis = one(spec.tpot_p99_ms, spec.tpot_ratio, "tpot")
    return ResolvedSlo(ttft, tpot, ttft_basis, tpot_basis)


def constraint_margins(result: TrialResult, slo: ResolvedSlo | None) -> dict[str, float]:
    """Signed relative margins, observed / limit - 1 (<= 0 met).

    A crashed trial, or one whose requests did not all complete, violates
    both by ``CRASH_VIOLATION``. A trial with no serving (fig12) has no SLO:
    both are met by construction, -1.0. A trial that served with no SLO to
    hold it to is a caller's bug: a missing limit is never met.
    """
    if result.crashed:
        return {k: CRASH_VIOLATION for k in CONSTRAINT_KEYS}
    if slo is None:
        if result.serving is not None:
            raise ValueError("a trial that served needs a resolved SLO (run the reference runs first)")
        return {k: -1.0 for k in CONSTRAINT_KEYS}
    s = result.serving
    if s is None or s.completed == 0 or s.failed > 0:
        return {k: CRASH_VIOLATION for k in CONSTRAINT_KEYS}
    return {
        "ttft_p99": s.ttft.p99_ms / slo.ttft_p99_ms - 1.0,
        "tpot_p99": s.tpot.p99_ms / slo.tpot_p99_ms - 1.0,
    }


def feasible(margins: dict[str, float]) -> bool:
    return all(v <= 0.0 for v in margins.values())
