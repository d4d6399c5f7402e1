from dataclasses import replace

import pytest

from autotune.backends import make_backend
from autotune.errors import UserError
from autotune.models import from_name
from autotune.sim import SimBackend
from autotune.trial import LoraServing, TrialKind
from autotune.workloads.spec import RequestSpec, Workload

from .helpers import poisson_workload, spec_for

W = poisson_workload(3.0, 60, seed=5)


def key_metrics(result):
    m = result.metrics()
    return [m[k] for k in ("ttft_p99_ms", "tpot_p99_ms", "itl_p50_ms", "peft_samples_per_s")]


def test_registered_as_the_sim_backend():
    b = make_backend("sim")
    assert isinstance(b, SimBackend)
    d = b.describe()
    assert d["backend"] == "sim" and d["hardware"] == "2x-rtx3090" == b.hardware  # the default profile
    assert d["gpus"] == 2 and d["gpu"] == "NVIDIA GeForce RTX 3090" and d["gpu_memory_gib"] == 23.69
    assert d["profile_status"] == "modelled"
    assert b.headline().startswith("simulated 2x-rtx3090: 2x NVIDIA GeForce RTX 3090") and "modelled" in b.headline()
    h100 = make_backend("sim", profile="h100-80gb").describe()
    assert (h100["hardware"], h100["gpus"], h100["profile_status"]) == ("h100-80gb", 1, "measured")


def test_identity_and_cache_key_follow_every_number_of_the_profile():
    one, two = SimBackend("h100-80gb"), SimBackend("h100-80gb", gpus=2)
    assert two.profile.gpus == 2 and two.describe()["gpus"] == 2
    assert one.identity() == {"hardware": "h100-80gb", "profile_digest": one.profile_digest(), "gpus": 1,
                              "noise": 0.0}
    assert two.identity()["gpus"] == 2 and two.profile_digest() != one.profile_digest()
    assert two.cache_key() != one.cache_key() != SimBackend("h100-80gb", noise=0.1).cache_key()
    assert SimBackend("h100-80gb", gpus=1).identity() == one.identity()
    assert SimBackend("h200").profile_digest() != one.profile_digest()
    with pytest.raises(UserError, match="--gpus must be at least 1"):
        SimBackend("h100-80gb", gpus=0)


def test_same_seed_same_result_and_noise_follows_the_seed():
    exact = SimBackend()
    a = exact.run_trial(spec_for("llmstation", workload=W, seed=1))
    b = exact.run_trial(spec_for("llmstation", workload=W, seed=2))
    assert key_metrics(a) == key_metrics(b)  # no noise: the seed does not matter
    noisy = SimBackend(noise=0.05)
    c1 = noisy.run_trial(spec_for("llmstation", workload=W, seed=1))
    c2 = SimBackend(noise=0.05).run_trial(spec_for("llmstation", workload=W, seed=1))
    d = noisy.run_trial(spec_for("llmstation", workload=W, seed=2))
    e = SimBackend(noise=0.05, seed_offset=7).run_trial(spec_for("llmstation", workload=W, seed=1))
    assert key_metrics(c1) == key_metrics(c2)
    assert key_metrics(c1) != key_metrics(d)
    assert key_metrics(c1) != key_metrics(e)
    assert key_metrics(c1) == pytest.approx(key_metrics(a), rel=0.15)


def test_bad_noise_is_a_user_error():
    with pytest.raises(UserError, match="noise"):
        SimBackend(noise=-0.1)


def test_progress_is_reported_a_few_times():
    calls = []
    SimBackend().run_trial(spec_for("vllm-torchtune", workload=W), lambda f, s: calls.append(f))
    assert 3 <= len(calls) <= 15
    assert calls == sorted(calls) and calls[0] == 0.0 and calls[-1] == 1.0


def test_memory_that_cannot_hold_the_weights_crashes_the_trial(backend):
    spec = spec_for("fineinfer", workload=W)
    spec = replace(spec, policy=replace(spec.policy, gpu_memory_utilization=0.15))
    result = backend.run_trial(spec)
    assert result.crashed and "out of memory" in result.error


def test_a_greedy_server_is_lowered_to_leave_the_trainer_its_copy_and_says_so(backend):
    # 0.9 x 79.18 GiB for vLLM leaves 7.9 GiB: not the trainer's 16.9 (its own 15 GiB of weights)
    spec = spec_for("vllm-torchtune", workload=W)
    spec = replace(spec, policy=replace(spec.policy, gpu_memory_utilization=0.9))
    result = backend.run_trial(spec)
    assert not result.crashed and result.serving.completed == len(W)
    assert any(n.startswith("vLLM's memory lowered from 0.9 to 0.79 of 79.2 GiB per GPU") for n in result.notes)
    plain = backend.run_trial(spec_for("vllm-torchtune", workload=W))  # 0.45: fits as it is
    assert not any("lowered" in n for n in plain.notes)


def test_one_24gb_gpu_cannot_hold_the_server_and_the_trainers_copy():
    result = SimBackend(gpus=1).run_trial(spec_for("vllm-torchtune", workload=W))  # 1 RTX 3090
    assert result.crashed and "out of memory" in result.error and "trainer 16.9 GiB" in result.error
    two = SimBackend().run_trial(spec_for("vllm-torchtune", workload=W))  # the default: 2 of them
    assert not two.crashed and two.serving.completed == len(W)


def test_failed_requests_are_counted_not_raised(backend):
    w = Workload((RequestSpec(0.0, 2000, 100), RequestSpec(0.5, 100, 10)), 1.0, 0, True, "one too long")
    result = backend.run_trial(spec_for("vllm-torchtune", workload=w, kind=TrialKind.SERVING_ALONE))
    assert not result.crashed
    assert result.serving.failed == 1 and result.serving.completed == 1


def test_served_lora_adapters_slow_decoding(backend):
    reqs = tuple(replace(r, adapter=i % 8) for i, r in enumerate(W.requests))
    w = replace(W, requests=reqs)
    base = backend.run_trial(spec_for("llmstation", workload=w, kind=TrialKind.SERVING_ALONE))
    rank8 = backend.run_trial(spec_for("llmstation", workload=w, kind=TrialKind.SERVING_ALONE,
                                       lora_serving=LoraServing(8, 8)))
    rank32 = backend.run_trial(spec_for("llmstation", workload=w, kind=TrialKind.SERVING_ALONE,
                                        lora_serving=LoraServing(8, 32)))
    assert base.serving.tpot.p50_ms < rank8.serving.tpot.p50_ms < rank32.serving.tpot.p50_ms


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-2-13b", "qwen2.5-7b"])
def test_other_presets_scale_with_their_shapes(backend, preset):
    eight = backend.run_trial(spec_for("vllm-torchtune", workload=W, kind=TrialKind.SERVING_ALONE))
    other = backend.run_trial(spec_for("vllm-torchtune", workload=W, kind=TrialKind.SERVING_ALONE,
                                       model=from_name(preset)))
    ratio = other.serving.tpot.p50_ms / eight.serving.tpot.p50_ms
    size = from_name(preset).num_params / from_name("llama-3.1-8b").num_params
    assert (ratio < 1) == (size < 1)
    assert other.serving.completed == len(W)
