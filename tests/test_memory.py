"""The per-GPU memory plan both backends use: Llama-3.1-8B on the paper's
2 x 24 GB (23.69 GiB as the driver reports each), by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autotune.errors import TrialCrash
from autotune.memory import GIB, TRAINER_CONTEXT_GIB, plan_for_trial, plan_memory
from autotune.models import from_name
from autotune.sim.profile import load_profile
from autotune.sim.simulation import memory_plan
from autotune.systems import get_system
from autotune.trial import TrialKind

from tests.sim.helpers import poisson_workload, spec_for

LLAMA8B = from_name("llama-3.1-8b")
GPU_GIB = 23.69
W = poisson_workload(2.0, 10, seed=0)


def policy(system: str, **params):
    s = get_system(system)
    return s.policy({**s.default_params(), **params})


def plan(system: str, gpus: int = 2, gpu_memory_gib: float = GPU_GIB, **kw):
    return plan_memory(LLAMA8B, policy(system), gpus=gpus, gpu_memory_gib=gpu_memory_gib, **kw)


def trainer_by_hand(gpus: int, seq_len: int = 512) -> dict[str, float]:
    """One FSDP rank of Llama-3.1-8B, LoRA rank 8 on q/k/v, bytes -> GiB."""
    root = 2 * 128256 * 4096  # embeddings + LM head (untied)
    layer = 218_112_000
    params = 32 * layer + root + 4096  # + the final norm: 8.03e9
    weights = (params / gpus + (gpus - 1) / gpus * (root + 2 * layer)) * 2  # shard + root and 2 layers gathered
    lora = 32 * 8 * ((4096 + 4096) + 2 * (4096 + 1024)) / gpus * (2 + 2 + 4 + 4)  # bf16 w + grad, fp32 AdamW
    activations = (32 * seq_len * 4096 * 2  # one checkpoint per layer
                   + seq_len * (6 * 4096 + 3 * 14336) * 2  # one layer recomputed
                   + 3 * seq_len * 128256 * 4)  # fp32 logits, softmax, gradient
    return {"weights": weights / GIB, "lora": lora / GIB, "activations": activations / GIB}


def test_the_models_size_is_what_the_hand_numbers_assume():
    assert LLAMA8B.num_params == 32 * 218_112_000 + 2 * 128256 * 4096 + 4096


def test_vllm_torchtune_fits_as_the_artifact_sets_it():
    p = plan("vllm-torchtune")
    assert p.notes == ()
    assert p.gpus == 2 and p.budget_gib == GPU_GIB and p.trainer_cap_gib is None
    assert p.server_gib == pytest.approx(0.45 * GPU_GIB)
    assert p.server_gpu_memory_utilization == pytest.approx(0.45)
    assert p.server_weights_gib == pytest.approx(LLAMA8B.num_params * 2 / 2 / GIB)  # bf16, half per GPU
    assert p.server_reserve_gib == 2.0 and p.server_adapters_gib == 0.0
    assert p.kv_cache_gib == pytest.approx(0.45 * GPU_GIB - LLAMA8B.num_params / GIB - 2.0)  # 1.18 GiB
    assert p.server_gib + p.trainer_gib < GPU_GIB
    # per GPU a token's KV is half of 131072 B; whole 16-token blocks
    assert p.kv_capacity_tokens(LLAMA8B, 16) == int(p.kv_cache_gib * GIB // 65536) // 16 * 16 == 19360


def test_the_trainers_parts_by_hand():
    p = plan("vllm-torchtune")
    hand = trainer_by_hand(gpus=2)
    assert p.trainer_weights_gib == pytest.approx(hand["weights"], rel=1e-12)  # 8.86 GiB
    assert p.trainer_lora_state_gib == pytest.approx(hand["lora"], rel=1e-12)
    assert p.trainer_activations_gib == pytest.approx(hand["activations"], rel=1e-12)  # 0.92 GiB
    assert p.trainer_gib == pytest.approx(sum(hand.values()) + TRAINER_CONTEXT_GIB, rel=1e-12)
    assert p.trainer_gib == pytest.approx(10.81, abs=0.01)
    one = plan("vllm-torchtune", gpus=1, gpu_memory_gib=79.18)  # one GPU: the whole copy, nothing gathered
    assert one.trainer_weights_gib == pytest.approx(LLAMA8B.num_params * 2 / GIB, rel=1e-12)


def test_llmstations_server_is_lowered_beside_the_trainer():
    p = plan("llmstation")
    assert len(p.notes) == 1 and "lowered from 0.75 to 0.54" in p.notes[0]
    assert p.server_gib + p.trainer_gib == pytest.approx(GPU_GIB)
    assert p.server_gib < 0.75 * GPU_GIB
    assert p.kv_cache_gib == pytest.approx(GPU_GIB - p.trainer_gib - LLAMA8B.num_params / GIB - 2.0)


def test_one_24gb_gpu_cannot_hold_server_and_trainer():
    with pytest.raises(TrialCrash, match="^out of memory: vLLM's 6.8 GiB per GPU do not hold 15.0 GiB of weights"):
        plan("vllm-torchtune", gpus=1)
    # a trainer alone would fit: it is the two copies together that do not
    alone = plan("vllm-torchtune", gpus=1, serves=False)
    assert alone.server_gib == 0.0 and alone.trainer_gib < GPU_GIB


def test_a_trainer_bigger_than_the_gpu_is_out_of_memory():
    with pytest.raises(TrialCrash, match="^out of memory: the trainer needs"):
        plan_memory(from_name("llama-2-13b"), policy("vllm-torchtune"), gpus=1, gpu_memory_gib=GPU_GIB)


def test_a_memory_budget_caps_the_trainer():
    # the artifact's 24 GB held on two 80 GB GPUs (--gpu-mem-gb)
    p = plan("vllm-torchtune", gpu_memory_gib=79.18, budget_gib=GPU_GIB)
    assert p.budget_gib == GPU_GIB and p.gpu_memory_gib == 79.18
    assert p.server_gib == pytest.approx(0.45 * GPU_GIB)
    assert p.server_gpu_memory_utilization == pytest.approx(0.45 * GPU_GIB / 79.18)  # of the whole GPU
    assert p.trainer_cap_gib == pytest.approx(GPU_GIB - 0.45 * GPU_GIB)
    assert p.trainer_memory_fraction == pytest.approx(0.55 * GPU_GIB / 79.18)
    # the same split as the 24 GB GPUs themselves
    assert p.kv_cache_gib == pytest.approx(plan("vllm-torchtune").kv_cache_gib)
    unbudgeted = plan("vllm-torchtune", gpu_memory_gib=79.18)
    assert unbudgeted.trainer_cap_gib is None and unbudgeted.trainer_memory_fraction is None


def test_serving_alone_plans_the_same_server_as_its_trials():
    colocated = plan_for_trial(spec_for("llmstation", workload=W), gpus=2, gpu_memory_gib=GPU_GIB)
    alone = plan_for_trial(spec_for("llmstation", workload=W, kind=TrialKind.SERVING_ALONE), gpus=2,
                           gpu_memory_gib=GPU_GIB)
    assert colocated.notes and alone.notes == colocated.notes  # lowered in both
    assert (alone.server_gib, alone.kv_cache_gib) == (colocated.server_gib, colocated.kv_cache_gib)
    assert alone.kv_capacity_tokens(LLAMA8B, 16) == colocated.kv_capacity_tokens(LLAMA8B, 16)


def test_trainer_alone_plans_no_server():
    p = plan_for_trial(spec_for("llmstation", kind=TrialKind.TRAINER_ALONE), gpus=2, gpu_memory_gib=GPU_GIB)
    assert p.server_gib == p.server_weights_gib == p.kv_cache_gib == 0.0 and p.notes == ()
    assert p.trainer_gib == pytest.approx(plan("llmstation").trainer_gib)


def test_the_chunk_size_does_not_change_the_server():
    # with a server big enough to be lowered, a trainer planned for its chunk would change it
    short, full = (plan_memory(LLAMA8B, replace(policy("chunked", chunk_size_tokens=c), gpu_memory_utilization=0.75),
                               gpus=2, gpu_memory_gib=GPU_GIB) for c in (32, 512))
    assert short.notes and full.notes
    assert short.server_gib == full.server_gib and short.kv_cache_gib == full.kv_cache_gib
    assert short.trainer_gib == full.trainer_gib


def test_served_adapters_take_their_share_of_the_server():
    p = plan("vllm-torchtune", served_adapters=8, served_adapter_rank=32)
    assert p.server_adapters_gib == pytest.approx(8 * LLAMA8B.lora_params(32) * 2 / 2 / GIB)
    assert p.kv_cache_gib == pytest.approx(plan("vllm-torchtune").kv_cache_gib - p.server_adapters_gib)


def test_the_simulator_plans_with_its_profile():
    rtx = load_profile("2x-rtx3090")
    spec = spec_for("vllm-torchtune", workload=W)
    assert memory_plan(spec, rtx) == plan_for_trial(spec, gpus=2, gpu_memory_gib=GPU_GIB,
                                                    server_reserve_gib=rtx.serving.activation_reserve_gib)
    h100 = memory_plan(spec, load_profile("h100-80gb"))
    assert h100.gpus == 1 and h100.server_reserve_gib == 4.0 and h100.notes == ()
    assert h100.kv_cache_gib == pytest.approx(0.45 * 79.18 - LLAMA8B.num_params * 2 / GIB - 4.0)
