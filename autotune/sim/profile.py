"""Cost profiles of the simulator: one TOML file per GPU kind.

A profile holds the hardware's roofline numbers, the serving engine's
scheduler limits and per-iteration costs, the trainer's per-tasklet host
(CPU launch) times and GPU efficiency, and the parameters of the contention
model under MPS. Every number carries its unit in its name, and the file says
which numbers were measured and which are modelled.

Loading checks every field: a missing, unknown or out-of-range one raises
``UserError`` naming the file and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from autotune.errors import UserError

#: The profile used when none is named.
DEFAULT_PROFILE = "h100-80gb"


@dataclass(frozen=True)
class Hardware:
    name: str  # what figures' rates are keyed by: "h100-80gb"
    gpu_memory_gib: float  # memory the driver reports as total, GiB
    hbm_bandwidth_gb_s: float  # datasheet HBM bandwidth, GB/s
    hbm_efficiency: float  # fraction of it that weight streaming reaches
    peak_bf16_tflops: float  # datasheet dense bf16 peak, TFLOP/s
    matmul_efficiency: float  # fraction of the peak that large GEMMs reach
    roofline_sharpness: float  # n in t = (t_mem^n + t_compute^n)^(1/n)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_gb_s * 1e9 * self.hbm_efficiency

    @property
    def flops_per_s(self) -> float:
        return self.peak_bf16_tflops * 1e12 * self.matmul_efficiency


@dataclass(frozen=True)
class Serving:
    max_num_batched_tokens: int  # token budget of one iteration (chunked prefill)
    max_num_seqs: int  # requests running at once
    max_model_len: int  # prompt + output tokens a request may have
    block_size_tokens: int  # KV-cache block (paged attention)
    activation_reserve_gib: float  # memory vLLM keeps for activations and CUDA graphs
    iteration_overhead_ms: float  # fixed cost of every iteration (scheduling, sampling, launches)
    nongemm_compute_fraction: float  # norms, rotary, activations: extra on the compute time
    frontend_delay_ms: float  # send -> the engine sees the request (HTTP, API server, IPC)
    lora_batch_overhead_ms: float  # a batch with any LoRA adapter (punica kernels)
    lora_per_adapter_ms: float  # each distinct adapter in a batch


@dataclass(frozen=True)
class Trainer:
    host_embed_ms: float  # CPU time to issue the embeddings tasklet
    host_layer_forward_ms: float  # one decoder layer, forward
    host_head_loss_ms: float  # LM head, loss and their backward
    host_layer_backward_ms: float  # one decoder layer: recompute (checkpointing) + backward
    host_optimizer_ms: float  # AdamW step over the LoRA weights + zero_grad
    gpu_eager_factor: float  # eager PyTorch GPU time / the GEMM roofline of the same tasklet
    backward_gpu_factor: float  # layer backward GPU time / forward (recompute 1 + backward 2)
    host_gpu_sharpness: float  # n in t = (t_host^n + t_gpu^n)^(1/n)
    pause_check_ms: float  # host cost of one pause point (sync + reading the channel)


@dataclass(frozen=True)
class Mps:
    thread_pct_speed_exponent: float  # GPU speed at active-thread fraction p = p^this
    memory_bound_loss: float  # speed memory-bound work loses beside a full-GPU kernel, 0..1
    memory_bound_loss_exponent: float  # ... beside one of speed share s: loss x s^this
    compute_bound_loss: float  # speed compute-bound work loses beside the other's kernels, 0..1
    trainer_host_slowdown: float  # trainer host time x (1 + this) while the server is busy
    timeslice_loss: float  # without MPS: speed lost while the other context runs, 0..1


@dataclass(frozen=True)
class Profile:
    hardware: Hardware
    serving: Serving
    trainer: Trainer
    mps: Mps
    source: str  # the file it was read from, or the packaged name
    provenance: str  # how its numbers were obtained (one line)
    measurements: int  # how many of its numbers were measured on the hardware

    @property
    def status(self) -> str:
        return f"modelled from roofline + {self.measurements} measurements, not calibrated"


_SECTIONS: dict[str, type] = {"hardware": Hardware, "serving": Serving, "trainer": Trainer, "mps": Mps}

# Fields that must be > 0; every other number must be >= 0.
_POSITIVE = {
    "gpu_memory_gib", "hbm_bandwidth_gb_s", "hbm_efficiency", "peak_bf16_tflops",
    "matmul_efficiency", "roofline_sharpness", "max_num_batched_tokens", "max_num_seqs",
    "max_model_len", "block_size_tokens", "gpu_eager_factor", "backward_gpu_factor",
    "host_gpu_sharpness", "thread_pct_speed_exponent",
}
_FRACTIONS = {"hbm_efficiency", "matmul_efficiency", "memory_bound_loss", "compute_bound_loss",
              "timeslice_loss"}  # at most 1 (losses: below 1)


def load_profile(profile: str | Path | None = None) -> Profile:
    """A profile by packaged name (``"h100-80gb"``) or by path to a TOML file."""
    if profile is None:
        profile = DEFAULT_PROFILE
    path = Path(profile)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"simulator profile {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        packaged = resources.files("autotune.sim.profiles") / f"{profile}.toml"
        if not packaged.is_file():
            raise UserError(f"unknown simulator profile {str(profile)!r}; choose one of: "
                            f"{', '.join(packaged_profiles())} or give a .toml path")
        text = packaged.read_text(encoding="utf-8")
        source = str(profile)
    return parse_profile(text, source)


def packaged_profiles() -> list[str]:
    root = resources.files("autotune.sim.profiles")
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def parse_profile(text: str, source: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"simulator profile {source}: not valid TOML ({e})") from None
    meta = data.pop("profile", {})
    if not isinstance(meta, dict):
        raise UserError(f"simulator profile {source}: [profile] must be a table")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise UserError(f"simulator profile {source}: unknown section(s) {', '.join(sorted(unknown))}")
    parts = {name: _section(data, name, cls, source) for name, cls in _SECTIONS.items()}
    measurements = meta.get("measurements", 0)
    if not isinstance(measurements, int) or measurements < 0:
        raise UserError(f"simulator profile {source}: [profile] measurements must be a count")
    return Profile(**parts, source=source, provenance=str(meta.get("provenance", "")),
                   measurements=measurements)


def _section(data: dict[str, Any], name: str, cls: type, source: str) -> Any:
    table = data.get(name)
    if not isinstance(table, dict):
        raise UserError(f"simulator profile {source}: missing section [{name}]")
    wanted = {f.name: f for f in fields(cls)}
    unknown = set(table) - set(wanted)
    if unknown:
        raise UserError(f"simulator profile {source}: unknown field(s) in [{name}]: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, f in wanted.items():
        if key not in table:
            raise UserError(f"simulator profile {source}: [{name}] is missing {key}")
        values[key] = _value(table[key], f.type, f"[{name}] {key}", source)
    return cls(**values)


def _value(v: Any, type_name: Any, where: str, source: str) -> Any:
    type_name = str(type_name)
    if type_name == "str":
        if not isinstance(v, str) or not v:
            raise UserError(f"simulator profile {source}: {where} must be a non-empty string")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"simulator profile {source}: {where} must be a number, got {v!r}")
    if type_name == "int" and not float(v).is_integer():
        raise UserError(f"simulator profile {source}: {where} must be an integer, got {v!r}")
    key = where.split()[-1]
    if key in _POSITIVE and not v > 0:
        raise UserError(f"simulator profile {source}: {where} must be > 0, got {v!r}")
    if v < 0:
        raise UserError(f"simulator profile {source}: {where} must be >= 0, got {v!r}")
    if key in _FRACTIONS and (v > 1 or (key.endswith("_loss") and v >= 1)):
        raise UserError(f"simulator profile {source}: {where} must be {'below' if key.endswith('_loss') else 'at most'} 1, got {v!r}")
    return int(v) if type_name == "int" else float(v)
