"""Sharing policies: what LLMStation's tasklet knobs mean in pause points."""

from __future__ import annotations

import pytest

from autotune.models import from_name
from autotune.policy import Preemption
from autotune.sim.costs import TrainerCostModel
from autotune.sim.profile import load_profile
from autotune.sim.trainer import plan_segments
from autotune.systems import get_system

LLMSTATION = get_system("llmstation")


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


@pytest.mark.parametrize("forward, backward", [(1, 1), (2, 3), (8, 8), (5, 33)])
def test_pause_points_are_the_simulators_pause_segments(forward, backward):
    model = from_name("llama-3.1-8b")
    tasklets = TrainerCostModel(model, load_profile("2x-rtx3090"), 512, 8).tasklets()
    segments = plan_segments(tasklets, _policy(forward, backward))
    pauses = [s for s in segments if s.pause_wait_s is not None]
    assert len(pauses) == sum(_policy(forward, backward).pause_points(model.num_layers))


def test_no_pause_point_without_tasklet_preemption():
    policy = get_system("vllm-torchtune").policy({"mps_active_thread_pct": 80})
    assert policy.preemption is Preemption.NONE and policy.pause_points(32) == (0, 0)
