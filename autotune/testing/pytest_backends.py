"""The conformance suite every backend passes, as a test-case class (Optuna's
``optuna/testing/pytest_samplers.py`` style).

A backend gets the whole suite by subclassing ``BackendConformance`` in the
tests with a ``backend_factory`` fixture (a callable that opens a new backend)
and, where it needs another model or workload, the ``model`` and ``workload``
fixtures. Every test runs once per registered system.

The suite checks the backend's contract (``autotune.backends.Backend``): the
three kinds of trial measure what they should; a trial that cannot run
(nothing fits in memory) comes back as a crash with its reason, never raised
and never with measurements; the same seed measures the same numbers (and,
on a noisy backend, another seed other numbers); every knob of every system
changes a measurement; ``close()`` may be called twice and leaves no process
of the backend running. A real GPU's timings vary from run to run: there the
same seed must replay the same requests (the same counts of requests and
tokens), not measure the same latencies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import psutil
import pytest

from autotune.backends import Backend
from autotune.models import ModelConfig, from_name
from autotune.systems import SYSTEMS, System, get_system
from autotune.testing.conformance import check_backend, small_workload
from autotune.trial import TrialKind, TrialResult, TrialSpec
from autotune.workloads.spec import Workload

#: Metrics that say how long the run took, not what it measured: left out of determinism checks.
WALL_CLOCK_METRICS = ("trial_wall_s",)
#: What a knob's move must change (at least one of them).
KNOB_METRICS = ("ttft_p99_ms", "tpot_p99_ms", "e2el_p99_ms", "peft_samples_per_s")
#: Layers that make any preset too big for one GPU of any profile (weights per GPU >> 80 GiB).
TOO_BIG_LAYER_FACTOR = 40


def colocated(system: System, model: ModelConfig, workload: Workload, seed: int = 0,
              params: Mapping[str, float] | None = None) -> TrialSpec:
    """A co-located trial of ``system`` at its defaults, or at ``params`` over them."""
    p = {**system.search_space().defaults(), **(params or {})}
    return TrialSpec(kind=TrialKind.COLOCATED, system=system.name, params=p, policy=system.policy(p), model=model,
                     workload=workload, seed=seed)


def measured(result: TrialResult) -> dict[str, float]:
    assert result.error is None, f"trial crashed: {result.error}"
    return {k: v for k, v in result.metrics().items() if k not in WALL_CLOCK_METRICS}


def replayed(result: TrialResult) -> tuple[int, int, int | None, int]:
    """What a run replayed, whatever its timing: requests completed and failed, tokens in and out."""
    assert result.error is None and result.serving is not None, f"trial crashed: {result.error}"
    s = result.serving
    return s.completed, s.failed, s.total_input_tokens, s.total_output_tokens


class BackendConformance:
    """Subclass with a ``backend_factory`` fixture; set ``noisy`` where seeds change
    measurements and ``timed`` where the backend measures real time."""

    #: Whether two seeds measure different numbers (a backend with noise, or a real GPU).
    noisy: bool = False
    #: Whether the backend times real runs (a GPU): the same seed then replays the
    #: same requests and tokens, but its latencies and throughput vary.
    timed: bool = False
    #: How much faster than alone serving may look beside the trainer before it is a
    #: failure: a timed backend's run-to-run spread (a light workload beside a small model's
    #: trainer slows serving by less than a GPU's noise).
    timing_tolerance: float = 0.01

    @pytest.fixture
    def backend_factory(self) -> Callable[[], Backend]:
        raise NotImplementedError("a subclass provides the backend_factory fixture")

    #: Whether the tests of a class share one backend (closed after the last of them): a GPU
    #: backend keeps its vLLM server between trials, and a server start costs minutes.
    shared_backend: bool = False

    @pytest.fixture(scope="class")
    @classmethod
    def _shared(cls):
        """The class's one backend, made by the first test that needs it."""
        held: list[Backend] = []
        yield held
        for backend in held:
            backend.close()

    @pytest.fixture
    def backend(self, backend_factory, _shared):
        if not self.shared_backend:
            with backend_factory() as backend:
                yield backend
            return
        if not _shared:
            _shared.append(backend_factory())
        yield _shared[0]

    @pytest.fixture
    def model(self) -> ModelConfig:
        return from_name("llama-3.1-8b")

    @pytest.fixture
    def workload(self) -> Workload:
        return small_workload(n=20, rate_req_s=4.0)

    # class scope: the tests run system by system, so a shared GPU backend restarts its server
    # only where the next system's server differs
    @pytest.fixture(scope="class", params=list(SYSTEMS))
    @classmethod
    def system(cls, request) -> System:
        return get_system(request.param)

    def test_each_kind_of_trial_measures_what_it_should(self, backend, system, model, workload):
        results = check_backend(backend, system, model, workload)
        # Sharing costs something: beside the trainer, serving is no faster than alone,
        # and the trainer beside serving is slower than alone.
        alone, both = results["serving_alone"].serving, results["colocated"].serving
        assert both.tpot.mean_ms >= alone.tpot.mean_ms * (1 - self.timing_tolerance), (
            f"{system.name}: mean TPOT {both.tpot.mean_ms:.2f} ms beside the trainer, "
            f"{alone.tpot.mean_ms:.2f} ms alone")
        assert results["colocated"].peft.peft_samples_per_s < results["trainer_alone"].peft.peft_samples_per_s

    def test_a_trial_that_cannot_run_is_a_crash_with_its_reason(self, backend, system, model, workload):
        too_big = dataclasses.replace(model, name=f"{model.name}-x{TOO_BIG_LAYER_FACTOR}",
                                      num_layers=model.num_layers * TOO_BIG_LAYER_FACTOR)
        result = backend.run_trial(colocated(system, too_big, workload))
        assert result.crashed and "out of memory" in result.error, result.error
        assert result.serving is None or result.serving.completed == 0
        assert result.peft is None or result.peft.peft_samples_per_s == 0.0

    def test_the_same_seed_measures_the_same(self, backend, system, model, workload):
        first_run = backend.run_trial(colocated(system, model, workload, seed=3))
        again_run = backend.run_trial(colocated(system, model, workload, seed=3))
        first, again = measured(first_run), measured(again_run)
        if self.timed:
            assert replayed(first_run) == replayed(again_run)
            assert replayed(first_run)[:2] == (len(workload), 0), replayed(first_run)
        else:
            assert first == again
        if self.noisy:
            other = measured(backend.run_trial(colocated(system, model, workload, seed=4)))
            assert other != first

    def test_each_knob_changes_a_measurement(self, backend, system, model, workload):
        for knob in system.search_space():
            low, high = (int(v) if knob.type == "int" else v for v in (knob.low, knob.high))
            at_low = measured(backend.run_trial(colocated(system, model, workload, params={knob.name: low})))
            at_high = measured(backend.run_trial(colocated(system, model, workload, params={knob.name: high})))
            moved = [m for m in KNOB_METRICS if at_low.get(m) != at_high.get(m)]
            assert moved, f"{system.name}.{knob.name}: {low} and {high} measure the same"

    def test_close_twice_leaves_no_process_running(self, backend_factory, system, model, workload):
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        backend = backend_factory()
        backend.run_trial(colocated(system, model, workload))
        backend.close()
        backend.close()
        left = [p for p in me.children(recursive=True) if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"left running after close(): {[(p.pid, p.name()) for p in left]}"
