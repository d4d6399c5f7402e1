import numpy as np
import pytest

from autotune.models import from_name
from autotune.sim.costs import (
    ServingCostModel, Shapes, TrainerCostModel, ring_all_gather_s, ring_all_reduce_s, smooth_max,
)
from autotune.sim.fit import with_fields
from autotune.sim.profile import load_profile
from autotune.sim.simulation import Simulation
from autotune.sim.trainer import plan_segments
from autotune.trial import TrialKind

from .helpers import spec_for

PROFILE = load_profile("h100-80gb")
RTX = load_profile("2x-rtx3090")  # two GPUs: tensor parallel serving, two FSDP ranks
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
    assert m.duration_s(cost) * 1000 == pytest.approx(5.62 + 1.392, abs=0.05)  # ms


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


# h100-80gb with a per-request host cost (its own is 0): 0.05 ms per request sampled in an iteration.
SEQ = with_fields(PROFILE, {"serving.seq_overhead_ms": 0.05})


def test_seq_overhead_adds_its_cost_per_sampled_request_to_the_fixed_time():
    assert (PROFILE.serving.seq_overhead_ms, SEQ.serving.seq_overhead_ms) == (0.0, 0.05)
    base, seq = ServingCostModel(LLAMA8B, PROFILE), ServingCostModel(LLAMA8B, SEQ)
    # 8 decodes + 2 prefill chunks, one of them sampled: 9 sampled requests -> 1.392 + 0.05 x 9 = 1.842 ms
    args = dict(decode_count=8, decode_context_tokens=8 * 300, prefill_tokens=300, prefill_attn_pairs=300 * 150)
    a, b = base.iteration(**args, sampled_seqs=9), seq.iteration(**args, sampled_seqs=9)
    assert a.fixed_s == pytest.approx(1.39197e-3, rel=1e-12)
    assert b.fixed_s == pytest.approx(1.84197e-3, rel=1e-12)
    assert (b.memory_s, b.compute_s) == (a.memory_s, a.compute_s)  # host time only: nothing on the GPU
    assert seq.duration_s(b) - base.duration_s(a) == pytest.approx(0.45e-3, rel=1e-9)
    # per *sampled* request: the decode count alone does not change it
    assert seq.iteration(**args, sampled_seqs=1).fixed_s == pytest.approx(1.44197e-3, rel=1e-12)
    assert seq.iteration(**{**args, "decode_count": 2}, sampled_seqs=9).fixed_s == pytest.approx(1.84197e-3, rel=1e-12)
    # beside the LoRA costs: 1.392 + 0.05 x 9 + 0.5 (any adapter) + 3 x the per-adapter cost
    lora = ServingCostModel(LLAMA8B, SEQ, lora_rank=8).iteration(**args, sampled_seqs=9, adapters=3)
    sv = SEQ.serving
    assert lora.fixed_s == pytest.approx((1.84197 + sv.lora_batch_overhead_ms + 3 * sv.lora_per_adapter_ms) / 1000,
                                         rel=1e-12)
    # two GPUs: the tensor-parallel collectives on top, unchanged
    two = ServingCostModel(LLAMA8B, SEQ.with_gpus(2))
    assert two.iteration(**args, sampled_seqs=9).fixed_s == pytest.approx(1.84197e-3 + two.tp_comm_s(308, 9), rel=1e-12)


def test_seq_overhead_adds_its_cost_per_decode_to_every_step_of_a_decode_run():
    base, seq = ServingCostModel(LLAMA8B, PROFILE), ServingCostModel(LLAMA8B, SEQ)
    args = dict(decode_count=16, context_tokens=16 * 300, steps=40, adapters=0, memory_stretch=1.2,
                compute_stretch=1.1)
    extra = seq.decode_run_s(**args) - base.decode_run_s(**args)
    np.testing.assert_allclose(extra, np.full(40, 0.05 * 16 / 1000), rtol=1e-9)  # 0.8 ms on each step
    extra = seq.decode_run_s(**{**args, "decode_count": 3}) - base.decode_run_s(**{**args, "decode_count": 3})
    np.testing.assert_allclose(extra, np.full(40, 0.05 * 3 / 1000), rtol=1e-9)


@pytest.mark.parametrize("gpus, adapters", [(1, 0), (1, 2), (2, 0)])
def test_bulk_decode_run_matches_iteration_by_iteration_with_a_seq_overhead(gpus, adapters):
    m = ServingCostModel(LLAMA8B, SEQ.with_gpus(gpus), lora_rank=16)
    run = m.decode_run_s(decode_count=16, context_tokens=16 * 300, steps=30, adapters=adapters,
                         memory_stretch=1.2, compute_stretch=1.1)
    one_by_one = [m.duration_s(m.iteration(16, 16 * 300 + 16 * k, 0, 0, 16, adapters), 1.2, 1.1) for k in range(30)]
    np.testing.assert_allclose(run, one_by_one, rtol=1e-9)
    without = ServingCostModel(LLAMA8B, PROFILE.with_gpus(gpus), lora_rank=16).decode_run_s(
        decode_count=16, context_tokens=16 * 300, steps=30, adapters=adapters, memory_stretch=1.2,
        compute_stretch=1.1)
    assert (run > without).all()  # the overhead is in both paths, not 0 in both


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


# -- several GPUs ---------------------------------------------------------------------

def test_ring_collectives():
    # 2 GPUs, 1 MB, 10 GB/s, 15 us a step: an all-reduce is 2 steps and moves the buffer once
    assert ring_all_reduce_s(1e6, 2, 10e9, 15e-6) == pytest.approx(2 * 15e-6 + 1e6 / 1e10)  # 130 us
    assert ring_all_gather_s(1e6, 2, 10e9, 15e-6) == pytest.approx(15e-6 + 0.5 * 1e6 / 1e10)  # 65 us
    # 4 GPUs: 2(N-1) = 6 steps and 2(N-1)/N = 1.5 buffers; a gather half that
    assert ring_all_reduce_s(1e6, 4, 10e9, 15e-6) == pytest.approx(6 * 15e-6 + 1.5e6 / 1e10)  # 240 us
    assert ring_all_gather_s(1e6, 4, 10e9, 15e-6) == pytest.approx(3 * 15e-6 + 0.75e6 / 1e10)  # 120 us
    assert ring_all_reduce_s(1e6, 1, 10e9, 15e-6) == 0.0 == ring_all_gather_s(1e6, 1, 10e9, 15e-6)
    np.testing.assert_allclose(ring_all_reduce_s(np.array([0.0, 1e6]), 2, 10e9, 15e-6), [30e-6, 130e-6])
    np.testing.assert_array_equal(ring_all_gather_s(np.array([0.0, 1e6]), 1, 10e9, 15e-6), [0.0, 0.0])


def test_two_gpu_decode_iteration_is_half_the_weights_plus_the_collectives():
    d, e, sv = RTX.datasheet, RTX.efficiency, RTX.serving
    s = Shapes.of(LLAMA8B)
    bw = d.memory_bandwidth_gb_s * 1e9 * e.memory_efficiency  # one GPU: 936 GB/s x 0.80
    flops = d.peak_bf16_tflops * 1e12 * e.matmul_efficiency
    link = d.interconnect_bandwidth_gb_s * 1e9 * e.interconnect_efficiency  # 31.5 GB/s x 0.35
    lat = e.collective_step_latency_us * 1e-6
    assert (bw, link, lat) == pytest.approx((936e9 * 0.80, 31.5e9 * 0.35, 15e-6))
    memory_s = (s.weight_bytes + 400 * 131072) / 2 / bw  # each GPU reads half the weights and KV
    compute_s = (2 * 32 * s.layer_params + 2 * s.head_params + s.attn_flops_per_pair * 400) / 2 / flops * 1.1
    # per layer two all-reduces of 1 token x 4096 x 2 B; the sampled row of the logits gathered
    all_reduce = 2 * lat + 4096 * 2 / link
    gather = lat + 0.5 * 128256 * 2 / link
    comm_s = 2 * 32 * all_reduce + gather
    m = ServingCostModel(LLAMA8B, RTX)
    cost = m.iteration(decode_count=1, decode_context_tokens=400, prefill_tokens=0, prefill_attn_pairs=0,
                       sampled_seqs=1)
    assert cost.memory_s == pytest.approx(memory_s, rel=1e-9)
    assert cost.compute_s == pytest.approx(compute_s, rel=1e-9)
    assert cost.fixed_s == pytest.approx(sv.iteration_overhead_ms / 1000 + comm_s, rel=1e-9)
    assert m.tp_comm_s(1, 1) == pytest.approx(comm_s, rel=1e-9)
    expected = sv.iteration_overhead_ms / 1000 + comm_s + (memory_s**3 + compute_s**3) ** (1 / 3)
    assert m.duration_s(cost) == pytest.approx(expected, rel=1e-9)
    assert m.duration_s(cost) * 1000 == pytest.approx(10.06 + 1.392 + 1.99, abs=0.05)  # ms


def test_tensor_parallel_halves_the_per_gpu_work_on_the_same_gpu():
    one, two = ServingCostModel(LLAMA8B, PROFILE), ServingCostModel(LLAMA8B, PROFILE.with_gpus(2))
    a, b = one.iteration(16, 16 * 300, 0, 0, 16), two.iteration(16, 16 * 300, 0, 0, 16)
    assert b.memory_s == pytest.approx(a.memory_s / 2) and b.compute_s == pytest.approx(a.compute_s / 2)
    assert one.tp_comm_s(16, 16) == 0.0
    assert b.fixed_s == pytest.approx(a.fixed_s + two.tp_comm_s(16, 16)) and two.tp_comm_s(16, 16) > 0
    # the bulk decode path adds the same collectives
    run = two.decode_run_s(decode_count=16, context_tokens=16 * 300, steps=5, adapters=0,
                           memory_stretch=1.2, compute_stretch=1.1)
    one_by_one = [two.duration_s(two.iteration(16, 16 * 300 + 16 * k, 0, 0, 16), 1.2, 1.1) for k in range(5)]
    np.testing.assert_allclose(run, one_by_one, rtol=1e-9)


def test_fsdp_ranks_train_one_sample_each_and_wait_on_their_gathers():
    d, e = RTX.datasheet, RTX.efficiency
    link = d.interconnect_bandwidth_gb_s * 1e9 * e.interconnect_efficiency
    lat = e.collective_step_latency_us * 1e-6
    s = Shapes.of(LLAMA8B)
    root_bytes = 2 * 128256 * 4096 * 2  # embeddings + LM head (untied), bf16
    layer_bytes = 218_112_000 * 2
    lora_layer_bytes = 8 * ((4096 + 4096) + 2 * (4096 + 1024)) * 2  # rank 8 on q, k, v
    root = lat + 0.5 * root_bytes / link  # a 2-GPU gather moves half of it
    layer = lat + 0.5 * layer_bytes / link
    layer_backward = layer + lat + 0.5 * lora_layer_bytes / link  # re-gathered + LoRA grads reduce-scattered
    assert s.layer_params * 2 == layer_bytes
    assert root * 1000 == pytest.approx(95.3, abs=0.1) and layer * 1000 == pytest.approx(19.8, abs=0.1)

    costs = TrainerCostModel(LLAMA8B, RTX, 512, 8)
    assert costs.samples_per_step == 2
    assert costs.comm() == pytest.approx({"root": root, "layer_forward": layer, "layer_backward": layer_backward},
                                         rel=1e-9)
    tasklets = {t.name: t for t in costs.tasklets()}
    assert tasklets["embed"].comm_s == pytest.approx(root, rel=1e-9)
    assert tasklets["layer0.fwd"].comm_s == tasklets["layer31.fwd"].comm_s == pytest.approx(layer, rel=1e-9)
    bwd = tasklets["layer0.bwd"]
    # prefetched during the previous layer's backward: only what outlasts its compute
    assert bwd.comm_s == pytest.approx(layer_backward - bwd.gpu_s, rel=1e-9) and bwd.comm_s > 0
    assert tasklets["head_loss"].comm_s == 0.0 == tasklets["optimizer"].comm_s
    # the GPU part is one rank's full-size sample: no split across ranks
    one_gpu = {t.name: t for t in TrainerCostModel(LLAMA8B, RTX.with_gpus(1), 512, 8).tasklets()}
    assert bwd.gpu_s == one_gpu["layer0.bwd"].gpu_s and bwd.host_s == one_gpu["layer0.bwd"].host_s


def test_a_tied_models_root_unit_is_one_matrix():
    tied = from_name("llama-3.2-1b")
    assert tied.tie_word_embeddings
    e = RTX.efficiency
    link = RTX.datasheet.interconnect_bandwidth_gb_s * 1e9 * e.interconnect_efficiency
    embed_bytes = 128256 * 2048 * 2  # the embeddings, which are the LM head
    root = e.collective_step_latency_us * 1e-6 + 0.5 * embed_bytes / link
    assert TrainerCostModel(tied, RTX, 512, 8).comm()["root"] == pytest.approx(root, rel=1e-9)


def test_one_gpu_trainer_has_no_collectives():
    costs = TrainerCostModel(LLAMA8B, PROFILE, 512, 8)
    assert costs.samples_per_step == 1
    assert costs.comm() == {"root": 0.0, "layer_forward": 0.0, "layer_backward": 0.0}
    assert all(t.comm_s == 0.0 for t in costs.tasklets())
    assert TrainerCostModel(LLAMA8B, RTX.with_gpus(1), 512, 8).comm()["root"] == 0.0


def test_a_two_gpu_step_trains_two_samples_in_host_vs_gpu_plus_comm_time():
    spec = spec_for("vllm-torchtune", {"mps_active_thread_pct": 100}, kind=TrialKind.TRAINER_ALONE, warmup_s=5.0)
    out = Simulation(spec, RTX).run()
    whole = out.iterations[1:-1]  # the last one is counted pro rata
    assert len(whole) > 10 and {it.tokens for it in whole} == {2 * 512}
    segments = plan_segments(TrainerCostModel(LLAMA8B, RTX, 512, 8).tasklets(), spec.policy)
    n = RTX.trainer.host_gpu_sharpness
    step_s = sum(smooth_max(g.host_s, g.gpu_s + g.comm_s, n) for g in segments)
    without_comm = sum(smooth_max(g.host_s, g.gpu_s, n) for g in segments)
    assert step_s > 1.5 * without_comm  # the link through the host is the bottleneck
    for it in whole:
        assert it.end_s - it.start_s == pytest.approx(step_s, rel=1e-9)
