"""Every registered system passes the conformance checks on its own; every
backend (the simulator, plain and noisy; the GPU under the ``gpu`` marker)
passes ``BackendConformance`` for every system; every storage kind (SQLite,
journal, PostgreSQL where ``AUTOTUNE_TEST_POSTGRES_URL`` is set) passes
``StorageConformance``."""

from __future__ import annotations

import dataclasses
import os

import pytest

from autotune.backends import make_backend
from autotune.knobs import Knob
from autotune.models import from_name
from autotune.systems import SYSTEMS, get_system
from autotune.testing.conformance import check_system, small_workload
from autotune.testing.pytest_backends import BackendConformance
from autotune.testing.pytest_storages import StorageConformance
from tests.test_storage import POSTGRES_ENV


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_system_conforms(name):
    check_system(get_system(name))


class TestSimBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self):
        return lambda: make_backend("sim")


class TestNoisySimBackend(BackendConformance):
    noisy = True

    @pytest.fixture
    def backend_factory(self):
        return lambda: make_backend("sim", noise=0.05)


class TestSharedSimBackend(BackendConformance):
    """The suite with one backend for all its tests, as the GPU's runs it."""

    shared_backend = True

    @pytest.fixture
    def backend_factory(self):
        return lambda: make_backend("sim")


@pytest.mark.gpu
class TestGpuBackend(BackendConformance):
    noisy = True
    timed = True
    shared_backend = True  # one server start for the suite (where the systems' servers agree), not one a test
    timing_tolerance = 0.15  # the simulator's 1% failed once on an H200 (llama-3.2-1b, 20 requests at 4 req/s)

    @pytest.fixture
    def backend_factory(self, tmp_path_factory):
        pytest.importorskip("vllm")
        return lambda: make_backend("gpu", runs_dir=tmp_path_factory.mktemp("gpu-runs"))

    @pytest.fixture
    def model(self):
        return from_name("llama-3.2-1b")


class TestSqliteStorage(StorageConformance):
    @pytest.fixture
    def storage_url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'studies.db'}"


class TestJournalStorage(StorageConformance):
    @pytest.fixture
    def storage_url(self, tmp_path):
        return str(tmp_path / "studies.log")


class TestPostgresqlStorage(StorageConformance):
    @pytest.fixture
    def storage_url(self):
        url = os.environ.get(POSTGRES_ENV)
        if not url:
            pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a PostgreSQL server and sets it)")
        pytest.importorskip("psycopg")
        return url  # each test's studies have names of their own


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
