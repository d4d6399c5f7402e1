"""The embedded simulator: a discrete-event model of a vLLM-style server,
a LoRA trainer run as tasklets, and the sharing policy between them, with
costs from a hardware profile (``profiles/*.toml``)."""

from autotune.sim.backend import SimBackend
from autotune.sim.profile import Profile, load_profile

__all__ = ["Profile", "SimBackend", "load_profile"]
