"""Sharing policies: what the knobs mean in pause points, gates and memory,
and every system's policy read alike by both backends (the simulator; the
GPU backend's pause points, start rule and memory planner, without a GPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from autotune.errors import UserError
from autotune.models import from_name
from autotune.policy import (BACKWARD, FORWARD, SAMPLE_TOKENS, ArrivalGate, PausePlan, SharingPolicy,
                             num_backward_tasklets, num_forward_tasklets)
from autotune.sim.costs import TrainerCostModel
from autotune.sim.profile import load_profile
from autotune.sim.simulation import Simulation, memory_plan
from autotune.sim.trainer import plan_segments
from autotune.systems import SYSTEMS, get_system
from autotune.testing.conformance import small_workload
from autotune.trial import TrialKind, TrialSpec

LLMSTATION = get_system("llmstation")
MODEL = from_name("llama-3.1-8b")
PROFILE = load_profile("2x-rtx3090")


def _policy(forward: int, backward: int):
    return LLMSTATION.policy({"forward_tasklets": forward, "forward_wait_s": 0.005, "backward_tasklets": backward,
                              "backward_wait_s": 0.005})


@pytest.mark.parametrize("forward, backward, expected", [
    (1, 1, (33, 32)),  # after every layer, and the head
    (8, 8, (5, 4)),  # the artifact's example: ceil(33 / 8), ceil(32 / 8)
    (33, 32, (1, 1)),  # once per pass, at its end
    (16, 1, (3, 32)),
])
def test_pause_points_per_pass_of_llama_8b(forward, backward, expected):
    assert _policy(forward, backward).pause_points(32) == expected


def test_pause_plan_pauses_every_n_and_at_the_end_of_a_pass():
    plan = PausePlan(forward_tasklets=8, forward_wait_s=0.01, backward_tasklets=3, backward_wait_s=0.02)
    forward = [i for i in range(33) if plan.wait_after_s(FORWARD, i, 33) is not None]
    backward = [i for i in range(32) if plan.wait_after_s(BACKWARD, i, 32) is not None]
    assert forward == [7, 15, 23, 31, 32] and backward == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 31]
    assert plan.wait_after_s(FORWARD, 7, 33) == 0.01 and plan.wait_after_s(BACKWARD, 31, 32) == 0.02


def test_no_pause_point_without_a_pause_plan():
    policy = get_system("vllm-torchtune").policy({"mps_active_thread_pct": 80})
    assert policy.pause_plan == PausePlan() and policy.pause_points(32) == (0, 0)
    assert all(policy.pause_plan.wait_after_s(FORWARD, i, 33) is None for i in range(33))


def test_only_an_arrival_gate_holds_the_trainer_back():
    gated = get_system("fineinfer").policy({"defer_s": 0.1})
    assert gated.arrival_gate == ArrivalGate(defer_s=0.1, poll_s=0.005) and gated.trainer_poll_s == 0.005
    assert gated.trainer_may_start(0) and not gated.trainer_may_start(1)
    free = get_system("chunked").policy({"chunk_size_tokens": 128})
    assert free.arrival_gate is None and free.trainer_may_start(0) and free.trainer_may_start(5)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_trainer_alone_keeps_the_server_and_drops_every_limit(name):
    system = get_system(name)
    policy = system.policy(system.default_params())
    alone = policy.trainer_alone()
    assert (alone.mps, alone.gpu_memory_utilization) == (policy.mps, policy.gpu_memory_utilization)
    assert (alone.trainer_mps_active_thread_pct, alone.trainer_seq_len_tokens) == (100, SAMPLE_TOKENS)
    assert alone.pause_points(32) == (0, 0) and alone.arrival_gate is None


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_policy_round_trips_through_its_dict(name):
    system = get_system(name)
    policy = system.policy(system.default_params())
    assert SharingPolicy.from_dict(policy.to_dict()) == policy


# ---------------------------------------------------------------- both backends read it alike


def _points(name: str) -> list[dict[str, float]]:
    """The defaults, every knob's ends and a few random points of the system's space."""
    space = get_system(name).search_space()
    rng = np.random.default_rng(0)
    points = [space.defaults()]
    for end in ("low", "high"):
        points.append({k.name: (int(getattr(k, end)) if k.type == "int" else getattr(k, end)) for k in space})
    for _ in range(4):
        points.append({k.name: (int(rng.integers(int(k.low), int(k.high) + 1)) if k.type == "int"
                                else float(rng.uniform(k.low, k.high))) for k in space})
    return points


def _spec(policy: SharingPolicy, name: str) -> TrialSpec:
    return TrialSpec(kind=TrialKind.COLOCATED, system=name, params={}, policy=policy, model=MODEL,
                     workload=small_workload(n=4), seed=0)


class _Channel:
    """The GPU trainer's channel with ``in_flight`` requests, never asked to stop."""

    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.in_iteration = False

    def requests_in_flight(self) -> int:
        return self.in_flight

    def set_trainer_in_iteration(self, value: bool) -> None:
        self.in_iteration = value

    def stop_requested(self) -> bool:
        return False


@pytest.mark.parametrize("name", list(SYSTEMS))
class TestBothBackendsReadTheSamePolicy:
    def test_pause_points(self, name):
        """The simulator's segments end where the GPU trainer's pause points fall, with the same waits."""
        pytest.importorskip("torch")
        from autotune.gpu.tasklets import PausePoints, Tasklet

        layers = MODEL.num_layers
        tasklets = TrainerCostModel(MODEL, PROFILE, 512, 8).tasklets()
        for params in _points(name):
            policy = get_system(name).policy(params)
            sim, done = [], 0  # tasklets run: the embeddings (not counted), the forward's, the backward's
            forward_run = 1 + num_forward_tasklets(layers)
            for seg in plan_segments(tasklets, policy):
                done += seg.tasklets
                if seg.pause_wait_s is not None:
                    sim.append((FORWARD, done - 2, seg.pause_wait_s) if done <= forward_run
                               else (BACKWARD, done - forward_run - 1, seg.pause_wait_s))
            checks: list[tuple[str, int]] = []
            slept: list[tuple[str, int, float]] = []
            gpu = PausePoints(_Channel(1), policy.pause_plan, layers)
            for pass_name, n in ((FORWARD, num_forward_tasklets(layers)), (BACKWARD, num_backward_tasklets(layers))):
                for i in range(n):
                    gpu.sync = lambda p=pass_name, i=i: checks.append((p, i))
                    gpu.sleep = lambda s, p=pass_name, i=i: slept.append((p, i, s))
                    gpu.after(Tasklet(pass_name, i))
            assert [(p, i) for p, i, _ in sim] == checks, (name, params)  # where it looks at the channel
            assert [x for x in sim if x[2] > 0] == slept, (name, params)  # and sleeps, requests in flight
            assert (sum(1 for p in checks if p[0] == FORWARD), sum(1 for p in checks if p[0] == BACKWARD)) == \
                policy.pause_points(layers)

    def test_trainer_start(self, name):
        """The simulated trainer and the GPU one start an iteration with requests in flight alike."""
        pytest.importorskip("torch")
        from autotune.gpu.trainer import enter_iteration

        for params in _points(name):
            policy = get_system(name).policy(params)
            sim = Simulation(_spec(policy, name), PROFILE)
            assert sim.trainer is not None
            for in_flight in (0, 1, 3):
                sim.channel.requests_in_flight = in_flight
                looks = iter([False, True])  # one more look after a wait, then asked to stop
                gpu = enter_iteration(_Channel(in_flight), policy, lambda: next(looks), sleep=lambda s: None)
                assert sim.trainer.may_start() == gpu == policy.trainer_may_start(in_flight), (name, in_flight)

    def test_memory_plan(self, name):
        """The GPU backend's planner splits each GPU as the simulator does, on the same GPUs."""
        pytest.importorskip("torch")
        from autotune.gpu.backend import GpuBackend

        gpu = object.__new__(GpuBackend)  # its planner, without the GPU checks
        gpu.gpus, gpu.gpu_mem_gb, gpu._gpu_mem_mib = PROFILE.gpus, None, PROFILE.datasheet.gpu_memory_gib * 1024
        policy = get_system(name).policy(get_system(name).default_params())
        spec = _spec(policy, name)
        sim_plan, gpu_plan = memory_plan(spec, PROFILE), gpu._memory(spec)
        for part in ("server_gib", "trainer_gib", "trainer_weights_gib", "trainer_activations_gib"):
            assert getattr(sim_plan, part) == pytest.approx(getattr(gpu_plan, part)), part
        assert not policy.trainer_shares_server_weights and sim_plan.trainer_weights_gib > 0
        # A trainer on the server's weights: the simulator plans none of its own; the GPU backend refuses it.
        shared = _spec(replace(policy, trainer_shares_server_weights=True), name)
        assert memory_plan(shared, PROFILE).trainer_weights_gib == 0.0
        with pytest.raises(UserError, match="own copy of the weights"):
            gpu._memory(shared)
