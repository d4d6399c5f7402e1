"""Execution-time model: a roofline of the model's shapes.

Serving: one engine iteration reads every weight once (plus the KV cache of
the batch) and does 2 FLOPs per weight per token; its GPU time is a smooth
roofline of the memory time and the compute time, plus a fixed overhead.
Trainer: each tasklet has a host (CPU launch) time from the profile and a GPU
time from the same roofline scaled for eager PyTorch. Contention under MPS
(``contention.py``) stretches the two parts of an iteration separately.

Several GPUs (``profile.gpus`` = N): the server runs tensor parallel N, so
each GPU reads 1/N of the weights and KV cache and does 1/N of the FLOPs,
and every decoder layer adds two all-reduces of the batch's hidden states
(after attention and after the MLP) plus one gather of the sampled logits,
over the profile's link. The trainer runs as N FSDP2 ranks as the GPU
backend builds it: each rank trains its own sample on full-size layers whose
weights it all-gathers per layer, once in the forward pass and once more in
the backward pass (recompute + backward: layers are resharded after
forward); the root unit (embeddings, LM head) is gathered once per step; the
LoRA gradients are reduce-scattered per layer. Collectives are rings: an
all-reduce of b bytes takes 2(N-1) steps of the link's latency plus
2(N-1)/N x b over its bandwidth; an all-gather or reduce-scatter half that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autotune.models import ModelConfig
from autotune.sim.profile import Profile

BF16_BYTES = 2


def ring_all_reduce_s(nbytes: float | np.ndarray, gpus: int, link_bytes_per_s: float,
                      step_latency_s: float) -> float | np.ndarray:
    """Time of a ring all-reduce of ``nbytes`` (each GPU's buffer) over ``gpus`` GPUs, s."""
    if gpus <= 1:
        return 0.0 * nbytes
    return 2 * (gpus - 1) * step_latency_s + 2 * (gpus - 1) / gpus * nbytes / link_bytes_per_s


def ring_all_gather_s(nbytes: float | np.ndarray, gpus: int, link_bytes_per_s: float,
                      step_latency_s: float) -> float | np.ndarray:
    """Time of a ring all-gather (or reduce-scatter) whose gathered result is ``nbytes``, s."""
    if gpus <= 1:
        return 0.0 * nbytes
    return (gpus - 1) * step_latency_s + (gpus - 1) / gpus * nbytes / link_bytes_per_s


def smooth_max(a: float | np.ndarray, b: float | np.ndarray, n: float) -> float | np.ndarray:
    """(a^n + b^n)^(1/n): max(a, b) with a soft corner (n large -> max)."""
    return (a**n + b**n) ** (1.0 / n)


@dataclass(frozen=True)
class Shapes:
    """Per-model constants the cost model needs (bytes, FLOPs)."""

    layer_params: int  # weights of one decoder layer
    head_params: int  # LM head (vocab x hidden), read every iteration even when tied
    attn_flops_per_pair: int  # FLOPs per (query token, key token) over all layers (QK^T + PV)
    kv_bytes_per_token: int  # KV cache, all layers
    lora_bytes_per_rank: int  # LoRA on q/k/v of every layer, bytes per unit of rank
    num_layers: int
    vocab_size: int
    hidden_size: int

    @classmethod
    def of(cls, m: ModelConfig) -> Shapes:
        h = m.hidden_size
        embed = m.vocab_size * h
        head = 0 if m.tie_word_embeddings else embed
        layer = (m.num_params - embed - head - h) // m.num_layers
        return cls(
            layer_params=layer,
            head_params=embed,
            attn_flops_per_pair=4 * m.num_layers * m.num_heads * m.head_dim,
            kv_bytes_per_token=m.kv_bytes_per_token(BF16_BYTES),
            lora_bytes_per_rank=m.lora_params(1) * BF16_BYTES,
            num_layers=m.num_layers,
            vocab_size=m.vocab_size,
            hidden_size=h,
        )

    @property
    def weight_bytes(self) -> int:
        """Weights one forward pass reads (layers + head; embedding rows are negligible)."""
        return (self.num_layers * self.layer_params + self.head_params) * BF16_BYTES

    @property
    def linear_flops_per_token(self) -> int:
        return 2 * self.num_layers * self.layer_params


@dataclass(frozen=True)
class IterationCost:
    """Solo GPU times of one serving iteration, s; contention stretches them."""

    memory_s: float  # weights + KV bytes / bandwidth (per GPU)
    compute_s: float  # FLOPs / achievable FLOP rate (per GPU)
    fixed_s: float  # what does not contend: CPU side, LoRA kernel launches, tensor-parallel collectives

    @property
    def compute_share(self) -> float:
        """How compute-bound the iteration is, 0..1 (its roofline weight)."""
        return self.compute_s / (self.compute_s + self.memory_s)


class ServingCostModel:
    """Times of vLLM-style iterations for one model on one profile, tensor
    parallel over the profile's GPUs."""

    def __init__(self, model: ModelConfig, profile: Profile, lora_rank: int | None = None) -> None:
        self.shapes = Shapes.of(model)
        self.profile = profile
        self.cfg = profile.serving
        self.lora_rank = lora_rank
        self.gpus = profile.gpus
        # per GPU: bytes/s and FLOP/s of 1/N of the work, so divide once here
        self._bytes_per_s = profile.bandwidth_bytes_per_s * self.gpus
        self._flops_per_s = profile.flops_per_s * self.gpus

    def tp_comm_s(self, tokens: float | np.ndarray, sampled_seqs: float | np.ndarray) -> float | np.ndarray:
        """Collectives of one iteration, s: two all-reduces of the tokens' hidden
        states per layer, and the sampled rows of the vocab-parallel logits gathered."""
        p, s = self.profile, self.shapes
        lat = p.efficiency.collective_step_latency_us * 1e-6
        hidden = ring_all_reduce_s(tokens * s.hidden_size * BF16_BYTES, self.gpus, p.link_bytes_per_s, lat)
        logits = ring_all_gather_s(sampled_seqs * s.vocab_size * BF16_BYTES, self.gpus, p.link_bytes_per_s, lat)
        return 2 * s.num_layers * hidden + logits

    def iteration(self, decode_count: int, decode_context_tokens: float, prefill_tokens: int,
                  prefill_attn_pairs: float, sampled_seqs: int, adapters: int = 0) -> IterationCost:
        """One iteration's costs.

        decode_context_tokens: sum of the decoding requests' context lengths
        (KV read and attention). prefill_attn_pairs: sum over prefill chunks of
        chunk x (prior context + chunk / 2) (causal attention pairs).
        """
        s = self.shapes
        tokens = decode_count + prefill_tokens
        kv_bytes = s.kv_bytes_per_token * (decode_context_tokens + prefill_tokens)
        lora_bytes = adapters * (self.lora_rank or 0) * s.lora_bytes_per_rank
        memory_s = (s.weight_bytes + kv_bytes + lora_bytes) / self._bytes_per_s
        flops = (s.linear_flops_per_token * tokens
                 + 2 * s.head_params * sampled_seqs
                 + s.attn_flops_per_pair * (decode_context_tokens + prefill_attn_pairs))
        compute_s = flops / self._flops_per_s * (1.0 + self.cfg.nongemm_compute_fraction)
        fixed_ms = self.cfg.iteration_overhead_ms + self.cfg.seq_overhead_ms * sampled_seqs
        if adapters:
            fixed_ms += self.cfg.lora_batch_overhead_ms + adapters * self.cfg.lora_per_adapter_ms
        return IterationCost(memory_s, compute_s, fixed_ms / 1000.0 + float(self.tp_comm_s(tokens, sampled_seqs)))

    def duration_s(self, cost: IterationCost, memory_stretch: float = 1.0, compute_stretch: float = 1.0) -> float:
        gpu = smooth_max(cost.memory_s * memory_stretch, cost.compute_s * compute_stretch,
                         self.profile.efficiency.roofline_sharpness)
        return cost.fixed_s + float(gpu)

    def decode_run_s(self, decode_count: int, context_tokens: float, steps: int, adapters: int,
                     memory_stretch: float, compute_stretch: float) -> np.ndarray:
        """Durations of ``steps`` decode-only iterations of a fixed batch, s.

        Each step adds one token to every request's context, so the KV bytes
        and attention FLOPs grow linearly; shape [steps].
        """
        s = self.shapes
        ctx = context_tokens + decode_count * np.arange(steps, dtype=np.float64)  # [steps]
        lora_bytes = adapters * (self.lora_rank or 0) * s.lora_bytes_per_rank
        memory_s = (s.weight_bytes + lora_bytes + s.kv_bytes_per_token * ctx) / self._bytes_per_s
        flops = ((s.linear_flops_per_token + 2 * s.head_params) * decode_count
                 + s.attn_flops_per_pair * ctx)
        compute_s = flops / self._flops_per_s * (1.0 + self.cfg.nongemm_compute_fraction)
        fixed_ms = self.cfg.iteration_overhead_ms + self.cfg.seq_overhead_ms * decode_count
        if adapters:
            fixed_ms += self.cfg.lora_batch_overhead_ms + adapters * self.cfg.lora_per_adapter_ms
        gpu = smooth_max(memory_s * memory_stretch, compute_s * compute_stretch,
                         self.profile.efficiency.roofline_sharpness)
        return fixed_ms / 1000.0 + float(self.tp_comm_s(decode_count, decode_count)) + gpu


@dataclass(frozen=True)
class Tasklet:
    name: str  # "embed", "layer3.fwd", "head_loss", "layer3.bwd", "optimizer"
    host_s: float  # CPU time to issue it (eager PyTorch, launch-bound at batch 1)
    gpu_s: float  # GPU time with the whole GPU to itself
    gpu_compute_share: float  # how compute-bound its GPU work is, 0..1
    comm_s: float = 0.0  # FSDP collectives it waits for, s: they hold the link, not the SMs


class TrainerCostModel:
    """Tasklets of one LoRA training step: batch 1 x ``seq_len`` tokens per
    rank, activation checkpointing, AdamW; FSDP2 over the profile's GPUs."""

    def __init__(self, model: ModelConfig, profile: Profile, seq_len_tokens: int, lora_rank: int) -> None:
        self.shapes = Shapes.of(model)
        self.model = model
        self.profile = profile
        self.cfg = profile.trainer
        self.seq_len = seq_len_tokens
        self.lora_rank = lora_rank
        self.gpus = profile.gpus

    @property
    def samples_per_step(self) -> int:
        """Every rank trains its own sample."""
        return self.gpus

    def _gpu(self, bytes_read: float, flops: float) -> tuple[float, float]:
        """(eager GPU time s, compute share) of work reading ``bytes_read`` and doing ``flops``."""
        mem = bytes_read / self.profile.bandwidth_bytes_per_s
        comp = flops / self.profile.flops_per_s
        t = float(smooth_max(mem, comp, self.profile.efficiency.roofline_sharpness)) * self.cfg.gpu_eager_factor
        return t, comp / (mem + comp)

    def _gather_s(self, nbytes: float) -> float:
        """An FSDP all-gather (or reduce-scatter) of ``nbytes`` over the ranks, s."""
        p = self.profile
        return float(ring_all_gather_s(nbytes, self.gpus, p.link_bytes_per_s,
                                       p.efficiency.collective_step_latency_us * 1e-6))

    def layer_forward_gpu(self) -> tuple[float, float]:
        s, t = self.shapes, self.seq_len
        lora_params = self.model.lora_params(self.lora_rank) // s.num_layers
        flops = (2 * (s.layer_params + lora_params) * t
                 + s.attn_flops_per_pair // s.num_layers * t * t / 2)  # causal attention
        return self._gpu(s.layer_params * BF16_BYTES, flops)

    def head_loss_gpu(self) -> tuple[float, float]:
        s, t = self.shapes, self.seq_len
        logits_bytes = t * s.vocab_size * 4 * 4  # fp32 logits: write, softmax read/write, grad
        gpu, share = self._gpu(s.head_params * BF16_BYTES + logits_bytes, 2 * s.head_params * t)
        return gpu * 2.0, share  # forward + backward (input gradient only: weights frozen)

    def comm(self) -> dict[str, float]:
        """FSDP2 collectives per tasklet kind, s (all 0 on one GPU).

        ``root``: embeddings + LM head gathered at the first forward tasklet
        (kept until the step's end); ``layer_forward``: the layer's weights
        before its forward, not overlapped (no forward prefetch, and the host
        issues layer by layer); ``layer_backward``: gathered again, prefetched
        during the previous layer's backward (overlapped with its compute),
        plus the reduce-scatter of the layer's LoRA gradients.
        """
        s = self.shapes
        # one matrix when the LM head is the embeddings (tied), as FSDP holds it
        root = s.vocab_size * s.hidden_size * (1 if self.model.tie_word_embeddings else 2) * BF16_BYTES
        layer = s.layer_params * BF16_BYTES
        lora = self.model.lora_params(self.lora_rank) // s.num_layers * BF16_BYTES
        return {"root": self._gather_s(root), "layer_forward": self._gather_s(layer),
                "layer_backward": self._gather_s(layer) + self._gather_s(lora)}

    def tasklets(self) -> list[Tasklet]:
        """One training step in order: embeddings, layer forwards, head+loss,
        layer backwards (last layer first), optimizer."""
        c = self.cfg
        comm = self.comm()
        fwd_gpu, fwd_share = self.layer_forward_gpu()
        head_gpu, head_share = self.head_loss_gpu()
        bwd_gpu = fwd_gpu * c.backward_gpu_factor
        bwd_comm = max(0.0, comm["layer_backward"] - bwd_gpu)  # prefetched: only what outlasts the compute
        small = 20e-6  # s: embeddings lookup and the LoRA optimizer step on the GPU
        out = [Tasklet("embed", c.host_embed_ms / 1000.0, small, 0.0, comm["root"])]
        out += [Tasklet(f"layer{i}.fwd", c.host_layer_forward_ms / 1000.0, fwd_gpu, fwd_share,
                        comm["layer_forward"])
                for i in range(self.shapes.num_layers)]
        out.append(Tasklet("head_loss", c.host_head_loss_ms / 1000.0, head_gpu, head_share))
        out += [Tasklet(f"layer{i}.bwd", c.host_layer_backward_ms / 1000.0, bwd_gpu, fwd_share, bwd_comm)
                for i in reversed(range(self.shapes.num_layers))]
        out.append(Tasklet("optimizer", c.host_optimizer_ms / 1000.0, small, 0.0))
        return out
