"""Every registered system passes the conformance checks, on its own and on
the simulator backend."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.backends import make_backend
from autotune.knobs import Knob
from autotune.models import from_name
from autotune.systems import SYSTEMS, get_system
from autotune.testing.conformance import check_backend, check_system, small_workload


@pytest.fixture(scope="module")
def sim():
    with make_backend("sim") as backend:
        yield backend


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_system_conforms(name):
    check_system(get_system(name))


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_system_conforms_on_the_simulator(sim, name):
    results = check_backend(sim, get_system(name), from_name("llama-3.1-8b"), small_workload())
    # Sharing costs something: beside the trainer, serving is no faster than alone,
    # and the trainer beside serving is slower than alone.
    alone, both = results["serving_alone"].serving, results["colocated"].serving
    assert both.tpot.mean_ms >= alone.tpot.mean_ms * 0.99
    assert results["colocated"].peft.peft_samples_per_s < results["trainer_alone"].peft.peft_samples_per_s


def test_small_workload_is_deterministic_per_seed():
    a, b, c = small_workload(seed=1), small_workload(seed=1), small_workload(seed=2)
    assert a.requests == b.requests and a.requests != c.requests
    assert len(a) == 40 and a.requests[0].arrival_s == 0.0


def test_check_system_catches_a_default_outside_its_limits():
    base = get_system("vllm-torchtune")
    bad_knob = dataclasses.replace(base.knobs[0], default=150)

    class Broken(type(base)):
        knobs = (bad_knob,)

    with pytest.raises(AssertionError, match="default outside its limits"):
        check_system(Broken())


def test_check_system_catches_duplicate_knobs():
    knob = Knob("forward_tasklets", "int", "tasklets", default=8, min_allowed=1, max_allowed=64)
    base = get_system("llmstation")

    class Broken(type(base)):
        knobs = (knob, knob)

    with pytest.raises(AssertionError, match="duplicate knob names"):
        check_system(Broken())
