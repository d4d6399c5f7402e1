"""Hardware profiles of the simulator: one TOML file per machine.

A profile keeps apart what a datasheet gives and what must be measured:

- ``[datasheet]``: the GPU, how many, their memory, memory bandwidth, dense
  bf16 peak, SMs, and the link between them. Every field is a vendor's
  number (or the driver's report of the memory).
- ``[efficiency]``, ``[serving]``, ``[trainer]``, ``[mps]``: what the
  hardware reaches of its datasheet, the serving engine's limits and
  per-iteration costs, the trainer's host (CPU) times, and the contention
  model under MPS. These are measured on the machine, fitted to its trials,
  or carried over from another profile.

``[profile] carries = "h100-80gb"`` takes every measured section from that
packaged profile; the file's own tables then override single fields. That is
how a profile is built for hardware nobody here can measure (the paper's
2x RTX 3090), and how a datasheet-only transfer profile is scored.

``[provenance]`` says, for each measured field (``"serving.frontend_delay_ms"``),
how it was obtained: ``measured``, ``fitted``, ``modelled`` or ``spec``. A
carried field's provenance says where it came from. ``autotune list`` and the
results show them.

Loading checks every field: a missing, unknown or out-of-range one raises
``UserError`` naming the file and the field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from autotune.errors import UserError

#: The profile used when none is named: the paper's 8B setting.
DEFAULT_PROFILE = "2x-rtx3090"
#: How each measured number may have been obtained.
PROVENANCE_KINDS = ("measured", "fitted", "modelled", "spec")


@dataclass(frozen=True)
class Datasheet:
    name: str  # the profile's name, what figures' rates are keyed by: "2x-rtx3090"
    gpu: str  # the GPU as its vendor names it: "NVIDIA GeForce RTX 3090"
    gpus: int  # GPUs that serve (tensor parallel) and train (FSDP ranks)
    gpu_memory_gib: float  # each GPU's memory as the driver reports its total, GiB
    memory_bandwidth_gb_s: float  # each GPU's DRAM bandwidth, GB/s
    peak_bf16_tflops: float  # each GPU's dense bf16 tensor peak (FP32 accumulate), TFLOP/s
    sms: int  # streaming multiprocessors per GPU
    interconnect: str  # "PCIe 4.0 x16", "NVLink 4"
    interconnect_bandwidth_gb_s: float  # per GPU, per direction, GB/s


@dataclass(frozen=True)
class Efficiency:
    memory_efficiency: float  # fraction of the DRAM bandwidth that weight streaming reaches
    matmul_efficiency: float  # fraction of the bf16 peak that large GEMMs reach
    roofline_sharpness: float  # n in t = (t_mem^n + t_compute^n)^(1/n)
    interconnect_efficiency: float  # fraction of the link's bandwidth a large collective reaches
    collective_step_latency_us: float  # latency of one step of a ring collective, us


@dataclass(frozen=True)
class Serving:
    max_num_batched_tokens: int  # token budget of one iteration (chunked prefill)
    max_num_seqs: int  # requests running at once
    max_model_len: int  # prompt + output tokens a request may have
    block_size_tokens: int  # KV-cache block (paged attention)
    activation_reserve_gib: float  # per GPU: vLLM's activation peak, CUDA graphs, non-torch memory
    iteration_overhead_ms: float  # fixed cost of every iteration (scheduling, sampling, launches)
    seq_overhead_ms: float  # host cost per request in the batch (scheduling, sampling, output processing)
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


MEASURED_SECTIONS: dict[str, type] = {"efficiency": Efficiency, "serving": Serving, "trainer": Trainer, "mps": Mps}
_SECTIONS: dict[str, type] = {"datasheet": Datasheet, **MEASURED_SECTIONS}


@dataclass(frozen=True)
class Profile:
    datasheet: Datasheet
    efficiency: Efficiency
    serving: Serving
    trainer: Trainer
    mps: Mps
    source: str  # the file it was read from, or the packaged name
    provenance: str  # how its numbers were obtained (one line)
    status: str  # "measured": its own hardware's numbers; "modelled": some carried over or estimated
    carries: str | None = None  # the packaged profile its measured sections came from
    field_provenance: Mapping[str, str] = field(default_factory=dict, compare=False)  # "serving.x" -> how

    @property
    def name(self) -> str:
        return self.datasheet.name

    @property
    def gpus(self) -> int:
        return self.datasheet.gpus

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """DRAM bandwidth one GPU reaches streaming weights, bytes/s."""
        return self.datasheet.memory_bandwidth_gb_s * 1e9 * self.efficiency.memory_efficiency

    @property
    def flops_per_s(self) -> float:
        """bf16 FLOP/s one GPU reaches on large GEMMs."""
        return self.datasheet.peak_bf16_tflops * 1e12 * self.efficiency.matmul_efficiency

    @property
    def link_bytes_per_s(self) -> float:
        """Bytes/s one GPU moves to the next in a large collective."""
        return self.datasheet.interconnect_bandwidth_gb_s * 1e9 * self.efficiency.interconnect_efficiency

    def with_gpus(self, gpus: int) -> Profile:
        """The same machine with ``gpus`` GPUs (``--gpus`` on the simulator)."""
        if gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {gpus}")
        if gpus == self.gpus:
            return self
        return replace(self, datasheet=replace(self.datasheet, gpus=gpus))

    def provenance_counts(self) -> dict[str, int]:
        """How many measured-section numbers are of each provenance."""
        counts: dict[str, int] = {}
        for how in self.field_provenance.values():
            key = "carried over" if is_carried(how) else how
            counts[key] = counts.get(key, 0) + 1
        return counts

    def describe(self) -> str:
        """One line: what the machine is and how far to trust it."""
        d = self.datasheet
        gpus = f"{d.gpus}x {d.gpu}" if d.gpus > 1 else d.gpu
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.provenance_counts().items()))
        carried = f"; measured sections carried over from {self.carries}" if self.carries else ""
        return f"{gpus} ({d.gpu_memory_gib:g} GiB, {d.interconnect}): {self.status}{carried} [{counts}]"


def is_carried(provenance: str) -> bool:
    """Whether a field's provenance says it came from the carried profile ("measured on h100-80gb")."""
    return " on " in provenance


def load_profile(profile: str | Path | None = None) -> Profile:
    """A profile by packaged name (``"h100-80gb"``) or by path to a TOML file."""
    if profile is None:
        profile = DEFAULT_PROFILE
    text, source = _read(profile)
    return parse_profile(text, source)


def _read(profile: str | Path) -> tuple[str, str]:
    path = Path(profile)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"simulator profile {str(path)!r} does not exist")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"simulator profile {path}: cannot read it ({e})") from None
    packaged = resources.files("autotune.sim.profiles") / f"{profile}.toml"
    if not packaged.is_file():
        raise UserError(f"unknown hardware profile {str(profile)!r}; choose one of: "
                        f"{', '.join(packaged_profiles())} or give a .toml path")
    return packaged.read_text(encoding="utf-8"), str(profile)


def packaged_profiles() -> list[str]:
    root = resources.files("autotune.sim.profiles")
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def parse_profile(text: str, source: str, _carrying: tuple[str, ...] = ()) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"simulator profile {source}: not valid TOML ({e})") from None
    meta = data.pop("profile", {})
    marks = data.pop("provenance", {})
    if not isinstance(meta, dict) or not isinstance(marks, dict):
        raise UserError(f"simulator profile {source}: [profile] and [provenance] must be tables")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise UserError(f"simulator profile {source}: unknown section(s) {', '.join(sorted(unknown))}")
    status = meta.get("status", "modelled")
    if status not in ("measured", "modelled"):
        raise UserError(f"simulator profile {source}: [profile] status must be \"measured\" or \"modelled\"")

    base: Profile | None = None
    carries = meta.get("carries")
    if carries is not None:
        if not isinstance(carries, str) or carries in (*_carrying, source):
            raise UserError(f"simulator profile {source}: [profile] carries must name another packaged profile")
        base = parse_profile(_read(carries)[0], carries, (*_carrying, source))

    provenance: dict[str, str] = {}
    parts: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise UserError(f"simulator profile {source}: [{name}] must be a table")
        inherited = None if base is None or name == "datasheet" else getattr(base, name)
        parts[name] = _section(table, name, cls, source, inherited)
        if name == "datasheet":
            continue
        for f in fields(cls):
            key = f"{name}.{f.name}"
            if f.name in table:
                how = marks.get(key)
                if how not in PROVENANCE_KINDS:
                    raise UserError(f"simulator profile {source}: [provenance] \"{key}\" must be one of "
                                    f"{', '.join(PROVENANCE_KINDS)}, got {how!r}")
                provenance[key] = how
            else:
                assert base is not None  # _section required the field otherwise
                provenance[key] = f"{base.field_provenance[key].split(' ', 1)[0]} on {carries}"
    stray = set(marks) - set(provenance)
    if stray:
        raise UserError(f"simulator profile {source}: [provenance] names no field of this file: "
                        f"{', '.join(sorted(stray))}")
    if base is not None and status == "measured":
        raise UserError(f"simulator profile {source}: a profile that carries {carries}'s numbers is \"modelled\"")
    return Profile(**parts, source=source, provenance=str(meta.get("provenance", "")), status=status,
                   carries=carries, field_provenance=provenance)


def _section(table: dict[str, Any], name: str, cls: type, source: str, inherited: Any) -> Any:
    wanted = {f.name: f for f in fields(cls)}
    unknown = set(table) - set(wanted)
    if unknown:
        raise UserError(f"simulator profile {source}: unknown field(s) in [{name}]: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, f in wanted.items():
        if key in table:
            values[key] = _value(table[key], f.type, f"[{name}] {key}", source)
        elif inherited is not None:
            values[key] = getattr(inherited, key)
        else:
            raise UserError(f"simulator profile {source}: [{name}] is missing {key}")
    return cls(**values)


# Fields that must be > 0; every other number must be >= 0.
_POSITIVE = {
    "gpus", "gpu_memory_gib", "memory_bandwidth_gb_s", "peak_bf16_tflops", "sms", "interconnect_bandwidth_gb_s",
    "memory_efficiency", "matmul_efficiency", "roofline_sharpness", "interconnect_efficiency",
    "max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size_tokens", "gpu_eager_factor",
    "backward_gpu_factor", "host_gpu_sharpness", "thread_pct_speed_exponent",
}
_FRACTIONS = {"memory_efficiency", "matmul_efficiency", "interconnect_efficiency", "memory_bound_loss",
              "compute_bound_loss", "timeslice_loss"}  # at most 1 (losses: below 1)


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
