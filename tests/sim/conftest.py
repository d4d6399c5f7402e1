import pytest

from autotune.sim import SimBackend


@pytest.fixture(scope="session")
def backend() -> SimBackend:
    return SimBackend()
