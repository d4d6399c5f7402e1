"""The per-GPU memory plan: what the server and the trainer get on each GPU.

One function, ``plan_memory``, for both backends: the simulator sizes its KV
cache from the plan and fails a trial that does not fit; the GPU backend
passes the plan's budget to vLLM (``--gpu-memory-utilization``) and caps the
trainer with it (``torch.cuda.set_per_process_memory_fraction``). So the two
agree on what fits and what runs out of memory.

The split, per GPU (N GPUs: the server tensor parallel N, the trainer N
FSDP ranks):

- budget: the GPU's memory, or ``--gpu-mem-gb`` (the artifact's 24 GB cards
  on a larger GPU);
- server: the system's ``gpu_memory_utilization`` of the budget: 1/N of the
  weights and of any served adapters, vLLM's activation reserve, and the KV
  cache in what is left;
- trainer: its own copy of the weights, sharded 1/N (FSDP), plus the root unit
  (embeddings, LM head) and two decoder layers gathered in full, the LoRA
  weights with their gradients and AdamW state, the activations of one
  checkpointed step, and the process's CUDA context.

Whether the trainer holds its own copy of the weights or trains on the
server's is the sharing policy's ``trainer_shares_server_weights``. Every
system here runs the trainer as a separate process with its own copy (the
artifact's FineInfer and LLMStation train inside the serving engine on its
weights), and the GPU backend can run no other. Where the system's server budget and that trainer do
not fit together, the plan lowers the server's budget to what is left and
says so in ``notes``; where the server then cannot hold its weights, reserve
and one longest request, the trial cannot run: ``TrialCrash`` "out of memory".
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.errors import TrialCrash
from autotune.models import ModelConfig
from autotune.policy import SAMPLE_TOKENS, SharingPolicy
from autotune.trial import TrialKind, TrialSpec

GIB = 1024**3
BF16_BYTES = 2
FP32_BYTES = 4
#: The trainer process's CUDA context, cuBLAS workspace and allocator slack, GiB per GPU [modelled].
TRAINER_CONTEXT_GIB = 1.0
#: What vLLM keeps beside weights and KV cache (activation peak, CUDA graphs, NCCL and
#: non-torch memory), GiB per GPU [modelled]; a simulator profile gives its own.
SERVER_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class MemoryPlan:
    """GiB per GPU unless said otherwise."""

    gpus: int
    gpu_memory_gib: float  # the GPU's memory as the driver reports it
    budget_gib: float  # what the plan may hand out (the GPU's, or --gpu-mem-gb)
    server_gib: float  # vLLM's budget: weights + adapters + reserve + KV cache (0: no server)
    server_weights_gib: float
    server_adapters_gib: float
    server_reserve_gib: float
    kv_cache_gib: float
    trainer_gib: float  # what the trainer needs (0: no trainer)
    trainer_weights_gib: float  # its own copy: the shard plus what FSDP gathers at once
    trainer_lora_state_gib: float  # LoRA weights, gradients, AdamW moments
    trainer_activations_gib: float  # checkpoints, one layer's recompute, fp32 logits
    trainer_cap_gib: float | None  # the trainer's hard cap (a --gpu-mem-gb budget), None: none
    notes: tuple[str, ...] = ()  # what the plan changed and why

    @property
    def server_gpu_memory_utilization(self) -> float:
        """vLLM's ``--gpu-memory-utilization``: a fraction of the whole GPU."""
        return self.server_gib / self.gpu_memory_gib

    @property
    def trainer_memory_fraction(self) -> float | None:
        """``torch.cuda.set_per_process_memory_fraction`` for the trainer, or None."""
        return None if self.trainer_cap_gib is None else self.trainer_cap_gib / self.gpu_memory_gib

    def kv_capacity_tokens(self, model: ModelConfig, block_size_tokens: int) -> int:
        """Tokens the KV cache holds (vLLM: whole blocks)."""
        per_gpu_bytes = model.kv_bytes_per_token(BF16_BYTES) / self.gpus
        return int(self.kv_cache_gib * GIB // per_gpu_bytes) // block_size_tokens * block_size_tokens


def trainer_memory_gib(model: ModelConfig, gpus: int, seq_len_tokens: int, lora_rank: int,
                       own_weights: bool = True) -> dict[str, float]:
    """What one trainer rank holds at its peak, GiB, by part; ``own_weights``
    False: it trains on the server's copy of the base weights (no weights of its own)."""
    h, v, layers = model.hidden_size, model.vocab_size, model.num_layers
    root_params = v * h * (1 if model.tie_word_embeddings else 2)
    layer_params = (model.num_params - root_params - h) // layers
    gathered = (gpus - 1) / gpus * (root_params + 2 * layer_params)  # beyond its shard, while gathered
    weights = (model.num_params / gpus + gathered) * BF16_BYTES if own_weights else 0.0
    lora = model.lora_params(lora_rank) / gpus * (BF16_BYTES * 2 + FP32_BYTES * 2)  # weight, grad, 2 moments
    t = seq_len_tokens
    activations = (layers * t * h * BF16_BYTES  # one checkpoint per layer
                   + t * (6 * h + 3 * model.intermediate_size) * BF16_BYTES  # one layer recomputed
                   + 3 * t * v * FP32_BYTES)  # logits, their softmax and gradient in fp32
    return {"weights": weights / GIB, "lora_state": lora / GIB, "activations": activations / GIB,
            "context": TRAINER_CONTEXT_GIB}


def plan_memory(model: ModelConfig, policy: SharingPolicy, *, gpus: int, gpu_memory_gib: float,
                budget_gib: float | None = None, serves: bool = True, trains: bool = True,
                served_adapters: int = 0, served_adapter_rank: int = 0, trainer_lora_rank: int = 8,
                server_reserve_gib: float = SERVER_RESERVE_GIB, max_model_len: int = 2048,
                block_size_tokens: int = 16) -> MemoryPlan:
    """The split of each GPU for a system's trials.

    ``serves``/``trains``: whether the system's trials run a server and a
    trainer. A reference run (serving alone, trainer alone) is planned as the
    trials are, so its server is the trials' server.
    """
    assert gpus >= 1 and gpu_memory_gib > 0, (gpus, gpu_memory_gib)
    budget = gpu_memory_gib if budget_gib is None else budget_gib
    notes: list[str] = []
    need = {"weights": 0.0, "lora_state": 0.0, "activations": 0.0, "context": 0.0}
    if trains:
        # The server's budget must not change with the chunk size: plan for full samples.
        need = trainer_memory_gib(model, gpus, max(policy.trainer_seq_len_tokens, SAMPLE_TOKENS),
                                  trainer_lora_rank, own_weights=not policy.trainer_shares_server_weights)
    trainer = sum(need.values())
    if trainer > budget:
        raise TrialCrash(f"out of memory: the trainer needs {trainer:.1f} GiB per GPU "
                         f"({need['weights']:.1f} of weights), more than the {budget:.1f} GiB of each of {gpus} GPU(s)")

    weights = adapters = reserve = kv = server = 0.0
    if serves:
        weights = model.num_params * BF16_BYTES / gpus / GIB
        adapters = served_adapters * model.lora_params(served_adapter_rank) * BF16_BYTES / gpus / GIB
        reserve = server_reserve_gib
        server = policy.gpu_memory_utilization * budget
        if trains and server + trainer > budget:
            lowered = budget - trainer
            notes.append(
                f"vLLM's memory lowered from {policy.gpu_memory_utilization:g} to {lowered / budget:.2f} of "
                f"{budget:.1f} GiB per GPU: the trainer needs {trainer:.1f} GiB beside it "
                f"({need['weights']:.1f} of them its own copy of the weights)")
            server = lowered
        longest = model.kv_bytes_per_token(BF16_BYTES) / gpus * max_model_len / GIB
        kv = server - weights - adapters - reserve
        if kv < longest:
            raise TrialCrash(
                f"out of memory: vLLM's {server:.1f} GiB per GPU do not hold {weights:.1f} GiB of weights, "
                f"{reserve:.1f} GiB of activations and one {max_model_len}-token request "
                f"({gpus} GPU(s) of {budget:.1f} GiB, trainer {trainer:.1f} GiB)")
    cap = None if budget_gib is None or not trains else budget - server
    return MemoryPlan(
        gpus=gpus, gpu_memory_gib=gpu_memory_gib, budget_gib=budget, server_gib=server,
        server_weights_gib=weights, server_adapters_gib=adapters, server_reserve_gib=reserve, kv_cache_gib=kv,
        trainer_gib=trainer, trainer_weights_gib=need["weights"], trainer_lora_state_gib=need["lora_state"],
        trainer_activations_gib=need["activations"], trainer_cap_gib=cap, notes=tuple(notes),
    )


def plan_for_trial(spec: TrialSpec, *, gpus: int, gpu_memory_gib: float, budget_gib: float | None = None,
                   server_reserve_gib: float = SERVER_RESERVE_GIB, max_model_len: int = 2048,
                   block_size_tokens: int = 16) -> MemoryPlan:
    """The plan of a trial's system: a serving-alone reference keeps room for
    the trials' trainer (same server); a run with no serving plans no server."""
    lora = spec.lora_serving
    return plan_memory(
        spec.model, spec.policy, gpus=gpus, gpu_memory_gib=gpu_memory_gib, budget_gib=budget_gib,
        serves=spec.kind is not TrialKind.TRAINER_ALONE and spec.workload is not None, trains=True,
        served_adapters=lora.num_adapters if lora else 0, served_adapter_rank=lora.rank if lora else 0,
        trainer_lora_rank=spec.trainer_lora_rank, server_reserve_gib=server_reserve_gib,
        max_model_len=max_model_len, block_size_tokens=block_size_tokens,
    )
