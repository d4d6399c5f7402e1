import pytest

from autotune.sim import SimBackend


@pytest.fixture(scope="session")
def backend() -> SimBackend:
    """The measured H100 profile: the tests that use it pin its behaviour (the
    default profile, 2x-rtx3090, is tested by name where it matters)."""
    return SimBackend("h100-80gb")
