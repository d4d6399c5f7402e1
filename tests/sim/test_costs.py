import numpy as np
import pytest

from autotune.models import from_name
from autotune.sim.costs import ServingCostModel, Shapes, TrainerCostModel, smooth_max
from autotune.sim.profile import load_profile

PROFILE = load_profile()
LLAMA8B = from_name("llama-3.1-8b")


def test_shapes_of_llama_3_1_8b():
    s = Shapes.of(LLAMA8B)
    assert s.layer_params == 218_112_000
    assert s.weight_bytes == pytest.approx(15.01e9, rel=1e-3)  # layers + LM head, bf16
    assert s.kv_bytes_per_token == 131072  # 2 x 32 layers x 1024 x 2 B
    assert s.attn_flops_per_pair == 4 * 32 * 32 * 128


def test_decode_iteration_is_weight_streaming_plus_overhead():
    m = ServingCostModel(LLAMA8B, PROFILE)
    cost = m.iteration(decode_count=1, decode_context_tokens=400, prefill_tokens=0, prefill_attn_pairs=0,
                       sampled_seqs=1)
    bw = 3350e9 * 0.80
    assert cost.memory_s == pytest.approx((15.01e9 + 400 * 131072) / bw, rel=1e-3)
    assert cost.compute_s < 0.01 * cost.memory_s
    assert m.duration_s(cost) * 1000 == pytest.approx(5.62 + 1.24, abs=0.05)  # ms


def test_prefill_of_2048_tokens_is_compute_bound():
    m = ServingCostModel(LLAMA8B, PROFILE)
    cost = m.iteration(0, 0, 2048, 2048 * 1024, 1)
    assert cost.compute_share > 0.8
    # 2 x 7.0e9 linear weights x 2048 tokens at 0.67 x 989 TFLOP/s, +10% non-GEMM: ~47 ms
    assert 40 < m.duration_s(cost) * 1000 < 60


def test_bulk_decode_run_matches_iteration_by_iteration():
    m = ServingCostModel(LLAMA8B, PROFILE)
    run = m.decode_run_s(decode_count=16, context_tokens=16 * 300, steps=50, adapters=0,
                         memory_stretch=1.2, compute_stretch=1.1)
    one_by_one = [m.duration_s(m.iteration(16, 16 * 300 + 16 * k, 0, 0, 16), 1.2, 1.1) for k in range(50)]
    np.testing.assert_allclose(run, one_by_one, rtol=1e-9)
    assert run[-1] > run[0]  # the KV cache grows


def test_lora_adapters_add_cost_per_distinct_adapter():
    m = ServingCostModel(LLAMA8B, PROFILE, lora_rank=32)
    base = m.duration_s(m.iteration(8, 8 * 300, 0, 0, 8))
    one = m.duration_s(m.iteration(8, 8 * 300, 0, 0, 8, adapters=1))
    eight = m.duration_s(m.iteration(8, 8 * 300, 0, 0, 8, adapters=8))
    assert base < one < eight
    assert (one - base) * 1000 == pytest.approx(0.55, abs=0.05)  # batch overhead + one adapter, ms


def test_smooth_max_is_between_max_and_sum():
    assert smooth_max(3.0, 4.0, 2.0) == pytest.approx(5.0)
    assert 4.0 < smooth_max(3.0, 4.0, 8.0) < 4.1


def test_trainer_tasklets_of_one_step():
    tasklets = TrainerCostModel(LLAMA8B, PROFILE, 512, 8).tasklets()
    names = [t.name for t in tasklets]
    assert names[0] == "embed" and names[-1] == "optimizer"
    assert names[1:33] == [f"layer{i}.fwd" for i in range(32)]
    assert names[33] == "head_loss"
    assert names[34:66] == [f"layer{i}.bwd" for i in reversed(range(32))]
    fwd, bwd = tasklets[1], tasklets[34]
    assert bwd.gpu_s == pytest.approx(3.0 * fwd.gpu_s)  # recompute + backward
    assert sum(t.host_s for t in tasklets) > 3 * sum(t.gpu_s for t in tasklets)  # launch-bound at batch 1


def test_short_sequences_use_the_gpu_less_efficiently():
    def gpu_per_token(seq):
        return sum(t.gpu_s for t in TrainerCostModel(LLAMA8B, PROFILE, seq, 8).tasklets()) / seq
    assert gpu_per_token(32) > 4 * gpu_per_token(512)  # small matmuls are weight-read bound
