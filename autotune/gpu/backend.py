"""``--backend gpu``: each trial for real on the local NVIDIA GPU.

The parts: a stock vLLM OpenAI server (kept across trials while its flags do
not change), one LoRA trainer process built with torchtune's model builders
whose step runs as tasklets, the load generator, and a shared-memory channel
between load generator and trainer. A system's ``SharingPolicy`` decides the
MPS daemon and the trainer's MPS share, its sequence length, where it may stop
and how long it waits, the load generator's deferral gate, and the memory
split (the trainer holds its own copy of the weights).

A trial: server ready -> trainer started and warmed up (its first steps are
not counted) -> workload replayed -> trainer stopped -> metrics. Every child
runs in its own process group, owned by a ``ProcessRegistry``: nothing is left
after a trial, a crash or Ctrl-C.

``gpus=N`` (``--gpus``): the server runs tensor parallel N and the trainer as N
FSDP2 ranks, one per GPU, on GPUs 0..N-1 (``autotune.gpu.distributed``); the
MPS daemon, started without ``CUDA_VISIBLE_DEVICES`` of its own, serves every
GPU its clients see, and server and ranks all get its pipe and log folders.
``gpu_mem_gb=G`` (``--gpu-mem-gb``) holds each GPU to G GiB the way the
artifact's 24 GB GPUs were. How each GPU's memory is split between server and
trainer is the simulator's plan too (``autotune.memory``): vLLM gets the
plan's budget, and under ``--gpu-mem-gb`` the trainer is capped at the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autotune.backends._base import Backend, ProgressFn, no_progress
from autotune.errors import TrialCrash, UserError
from autotune.gpu.channel import Channel
from autotune.gpu.distributed import EXIT_OOM, TrainerRanks, rank_log_name, rank_path
from autotune.gpu.finetune_data import load_alpaca, load_tokenizer, model_tokenizer
from autotune.gpu.mps import MpsDaemon
from autotune.gpu.procs import ProcessRegistry
from autotune.gpu.server import Decision, ServerConfig, ServerKeeper, prefix_caching_in
from autotune.gpu.trainer import TrainerConfig, read_iteration_log, trainer_command
from autotune.memory import MemoryPlan, plan_for_trial
from autotune.metrics import peft_metrics, serving_metrics
from autotune.models import ModelConfig
from autotune.trial import TrialKind, TrialResult, TrialSpec
from autotune.workloads.spec import RequestSpec, Workload

TRAINER_READY_TIMEOUT_S = 600.0  # build, load and warm up the trainer
TRAINER_STOP_TIMEOUT_S = 60.0  # a step of a large model, then exit
TRAINER_ALONE_WINDOW_S = 30.0  # measurement window of trainer-alone trials
_POLL_S = 0.1


def _nvidia_smi_gpus() -> list[tuple[str, int]]:
    """(name, memory in MiB) of every GPU, from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        raise UserError("--backend gpu needs an NVIDIA GPU, and nvidia-smi did not answer") from None
    gpus = []
    for line in out.splitlines():
        if line.strip():
            name, mem = line.rsplit(",", 1)
            gpus.append((name.strip(), int(float(mem))))
    return gpus


def gpu_name() -> tuple[str, int]:
    """(name, memory in MiB) of GPU 0, from nvidia-smi."""
    return _nvidia_smi_gpus()[0]


def gpu_count() -> int:
    return len(_nvidia_smi_gpus())


def visible_gpus(nvidia_smi_count: int, env: Mapping[str, str]) -> int:
    """GPUs a CUDA program started with ``env`` sees (nvidia-smi ignores CUDA_VISIBLE_DEVICES)."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        return nvidia_smi_count
    return len([d for d in devices.split(",") if d.strip()])


#: GPUs with a packaged simulator profile and figure rates of their own: slug -> profile name.
KNOWN_HARDWARE = {"h100-80gb": "h100-80gb", "h200-140gb": "h200", "h200-141gb": "h200"}


def hardware_profile(name: str, memory_mib: int, gpus: int = 1, gpu_mem_gb: float | None = None) -> str:
    """A short profile name: "NVIDIA H100 80GB HBM3" -> "h100-80gb"; held to
    24 GiB on 2 GPUs: "h100-24gb-x2". A GPU with a packaged profile (one
    whole H100 or H200) gets that profile's name, so figures use its rates."""
    gb = round(gpu_mem_gb) if gpu_mem_gb is not None else round(memory_mib / 1024)
    short = name.replace("NVIDIA", "").replace("GeForce", "")
    model = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", short)
    slug = (model.group(1) if model else re.sub(r"\W+", "-", short).strip("-")).lower()
    profile = f"{slug}-{gb}gb" if gb else slug
    if gpus == 1 and gpu_mem_gb is None and profile in KNOWN_HARDWARE:
        return KNOWN_HARDWARE[profile]
    return f"{profile}-x{gpus}" if gpus > 1 else profile


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self, runs_dir: Path = Path("autotune-runs"), use_mps: bool = True,
                 vllm_args: tuple[str, ...] = (), model_path: Path | None = None,
                 finetune_data: Path | None = None, trainer_warmup_steps: int = 5,
                 server_startup_timeout_s: float = 900.0, gpus: int = 1, gpu_mem_gb: float | None = None,
                 server_port: int | None = None, mps_dir: Path | None = None) -> None:
        try:
            import aiohttp  # noqa: F401
            import vllm  # noqa: F401
        except ImportError as e:
            raise UserError(f"--backend gpu needs vLLM and the GPU extras ({e.name} is missing): "
                            "pip install 'autotune[gpu]'") from None
        self.finetune_data, self.tokenizer = _finetune_inputs(finetune_data, model_path)
        self._gpu, self._gpu_mem_mib = gpu_name()
        if gpus < 1 or gpus > (seen := visible_gpus(gpu_count(), os.environ)):
            raise UserError(f"--gpus {gpus}: this machine shows {seen} GPU(s)")
        if gpu_mem_gb is not None and not 0 < gpu_mem_gb <= self._gpu_mem_mib / 1024:
            raise UserError(f"--gpu-mem-gb {gpu_mem_gb:g} is not in (0, {self._gpu_mem_mib / 1024:.1f}], "
                            "the GPU's memory in GiB")
        self.gpus = gpus
        self.gpu_mem_gb = gpu_mem_gb
        self.root = Path(runs_dir) / "gpu" / time.strftime("%Y%m%d-%H%M%S")
        self.root.mkdir(parents=True, exist_ok=True)
        self.use_mps = use_mps
        self.server_port = server_port  # None: a free port (``--workers``: each worker its own)
        self.mps_dir = mps_dir  # the MPS daemon's pipe and log folders (None: one per process under /tmp)
        self.vllm_args = tuple(vllm_args)
        self.model_path = model_path
        self.warmup_steps = trainer_warmup_steps
        self.procs = ProcessRegistry()
        self.keeper = ServerKeeper(self.root / "logs", self.procs, startup_timeout_s=server_startup_timeout_s)
        self._mps = None  # MpsDaemon while it runs
        self._trials = 0

    # ------------------------------------------------------------ description

    @property
    def hardware(self) -> str:
        return hardware_profile(self._gpu, self._gpu_mem_mib, self.gpus, self.gpu_mem_gb)

    def identity(self) -> dict[str, Any]:
        """What of this backend changes a measurement: the GPU, and each choice
        that changes what runs on it. A choice appears only where it is not the
        default, so that studies stored before it was recorded resume as they were."""
        chosen = {
            "gpus": self.gpus if self.gpus != 1 else None,
            "gpu_mem_gb": self.gpu_mem_gb,
            "mps": False if not self.use_mps else None,
            "vllm_args": list(self.vllm_args) or None,  # the server's flags beyond the system's
            "model_path": str(self.model_path) if self.model_path is not None else None,  # real weights
            "finetune_data": str(self.finetune_data) if self.finetune_data is not None else None,
        }
        return {"hardware": self.hardware, **{k: v for k, v in chosen.items() if v is not None}}

    def cache_key(self) -> str:
        """Reference runs are reused only by studies whose backend choices match (the identity's)."""
        key = f"gpu:{self._gpu}"  # one GPU, all its memory: the key reference runs were cached under
        if self.gpus != 1 or self.gpu_mem_gb is not None:
            key += f":gpus={self.gpus}:gpu_mem_gb={self.gpu_mem_gb if self.gpu_mem_gb is not None else 'all'}"
        rest = {k: v for k, v in self.identity().items() if k not in ("hardware", "gpus", "gpu_mem_gb")}
        if rest:
            key += ":" + hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:10]
        return key

    def describe(self) -> dict[str, Any]:
        import torch
        import vllm

        return {
            "backend": self.name,
            "hardware": self.hardware,
            "gpu": self._gpu,
            "gpu_memory_mib": self._gpu_mem_mib,
            "gpus": self.gpus,
            "gpu_mem_gb": self.gpu_mem_gb,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpu": cpu_model(),  # the trainer is launch-bound and the API server CPU-bound: the host matters
            "mps": self.use_mps,
            "vllm_args": list(self.vllm_args),
            "server_flags": self.server_flags(),
            "prefix_caching": self.prefix_caching(),
            "finetune_data": str(self.finetune_data) if self.finetune_data is not None else "synthetic token ids",
            "run_dir": str(self.root),
        }

    def server_flags(self) -> list[str] | None:
        """The flags of the last server started (``ServerConfig.flags``: no
        port, no model folder), or None before any server ran."""
        last = self.keeper.last_started
        return last.flags() if last is not None else None

    def prefix_caching(self) -> bool:
        """Whether the server runs (or, before any ran, will run) with prefix caching."""
        last = self.keeper.last_started
        if last is not None:
            return last.prefix_caching
        user = prefix_caching_in(self.vllm_args)
        return ServerConfig.enable_prefix_caching if user is None else user

    # ------------------------------------------------------------ parts

    def _set_mps(self, want: bool) -> None:
        """MPS on or off. Clients join the daemon when they start CUDA, so a
        change restarts the server."""
        want = want and self.use_mps
        if want == (self._mps is not None):
            return
        self.keeper.stop()
        if self._mps is not None:
            self._mps.stop()
            self._mps = None
        if want:
            # Short paths: the daemon's pipe is a Unix socket (108-byte limit).
            base = self.mps_dir if self.mps_dir is not None else Path(f"/tmp/autotune-mps-{os.getpid()}")
            daemon = MpsDaemon(base / "pipe", self.root / "mps-log")
            daemon.start()
            self.procs.callback(daemon.stop)
            self._mps = daemon

    def _model_dir(self, model: ModelConfig) -> tuple[Path, bool]:
        """The folder the server loads, and whether it holds real weights."""
        if self.model_path is not None:
            return self.model_path, any(self.model_path.glob("*.safetensors"))
        from autotune.gpu.modelfiles import write_model_folder

        folder = self.root / "models" / model.name
        if not (folder / "config.json").exists():
            write_model_folder(model, folder, tokenizer=True)
        return folder, False

    def _memory(self, spec: TrialSpec) -> MemoryPlan:
        """The trial's per-GPU plan (``TrialCrash`` "out of memory" where nothing fits)."""
        if spec.policy.trainer_shares_server_weights:
            raise UserError(f"{spec.system}: the GPU backend runs the trainer as a process of its own, "
                            "with its own copy of the weights; it cannot train on the server's")
        return plan_for_trial(spec, gpus=self.gpus, gpu_memory_gib=self._gpu_mem_mib / 1024,
                              budget_gib=self.gpu_mem_gb)

    def _server(self, spec: TrialSpec):
        from autotune.gpu.modelfiles import write_lora_adapters

        folder, real = self._model_dir(spec.model)
        lora: tuple[tuple[str, str], ...] = ()
        rank = 0
        if spec.lora_serving is not None:
            root = self.root / "adapters" / f"{spec.model.name}-r{spec.lora_serving.rank}"
            pairs = write_lora_adapters(spec.model, root, count=spec.lora_serving.num_adapters,
                                        rank=spec.lora_serving.rank, seed=0) if not root.exists() else tuple(
                (p.name, p) for p in sorted(root.iterdir()))
            lora, rank = tuple((n, str(p)) for n, p in pairs), spec.lora_serving.rank
        config = ServerConfig(
            model=str(folder), served_model_name=spec.model.name, dummy_weights=not real,
            has_tokenizer=(folder / "tokenizer.json").exists(),
            tensor_parallel_size=self.gpus,
            gpu_memory_utilization=round(self._memory(spec).server_gpu_memory_utilization, 4), lora_modules=lora,
            max_lora_rank=rank, extra_args=self.vllm_args,
            env=tuple(sorted(self._mps.env().items())) if self._mps is not None else (),
            port=self.server_port,
        )
        return self.keeper.ensure(config)

    def _start_trainer(self, spec: TrialSpec, trial_dir: Path, channel_name: str | None):
        """The trainer's ranks (one per GPU), once rank 0 says all are ready."""
        policy = spec.policy
        if spec.kind is TrialKind.TRAINER_ALONE:
            policy = replace(policy, arrival_gate=None)  # no request to wait for
        config = TrainerConfig(
            model=str(self.model_path) if self.model_path is not None else spec.model.name,
            policy=policy.to_dict(), iteration_log=str(trial_dir / "iterations.jsonl"),
            status_path=str(trial_dir / "trainer-status.json"), lora_rank=spec.trainer_lora_rank,
            channel=channel_name, seed=spec.seed, warmup_steps=self.warmup_steps,
            memory_fraction=self._memory(spec).trainer_memory_fraction,
            finetune_data=str(self.finetune_data) if self.finetune_data is not None else None,
            tokenizer=str(self.tokenizer) if self.tokenizer is not None else None,
        )
        config.write(trial_dir / "trainer-config.json")
        env = dict(os.environ)
        if self._mps is not None:
            pct = policy.trainer_mps_active_thread_pct
            env.update(self._mps.env_for_client(pct if pct < 100 else None))
        ranks = TrainerRanks(self.procs, trainer_command(trial_dir / "trainer-config.json"), trial_dir, env,
                             self.gpus, grace_s=TRAINER_STOP_TIMEOUT_S)
        ranks.start()
        try:
            deadline = time.monotonic() + TRAINER_READY_TIMEOUT_S
            while _status(trial_dir).get("state") != "ready":  # rank 0 writes it after a barrier of all
                _check_ranks(ranks, trial_dir)
                if time.monotonic() > deadline:
                    raise TrialCrash(f"trainer not ready within {TRAINER_READY_TIMEOUT_S:g} s")
                time.sleep(_POLL_S)
        except BaseException:
            ranks.kill()
            raise
        return ranks

    def _stop_trainer(self, ranks, channel, trial_dir: Path) -> None:
        """Ask every rank to stop (through rank 0's channel, or SIGTERM), then end them."""
        if channel is not None:
            channel.request_stop()
        else:
            for proc in ranks.ranks:
                proc.terminate()  # SIGTERM: the ranks agree to stop between steps
        codes = ranks.wait(TRAINER_STOP_TIMEOUT_S)
        ranks.terminate()
        bad = [(r, c) for r, c in enumerate(codes) if c not in (0, None, -15)]
        if bad:
            first = ranks.first_exit()
            rank, code = first if first is not None and first[1] not in (0, -15) else bad[0]
            raise TrialCrash(_trainer_failure(code, trial_dir, rank, ranks.world_size))

    # ------------------------------------------------------------ a trial

    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        t0 = time.monotonic()
        self._trials += 1
        label = spec.label or (f"trial-{spec.number}" if spec.number is not None else f"{spec.kind.value}-{self._trials}")
        trial_dir = self.root / label
        trial_dir.mkdir(parents=True, exist_ok=True)
        notes = () if self.use_mps or not spec.policy.mps else ("MPS off (--no-mps)",)
        try:
            notes += self._memory(spec).notes  # the plan's changes, e.g. a lowered server budget
            result = self._run(spec, trial_dir, progress)
        except TrialCrash as e:
            return TrialResult.crash(str(e), wall_s=time.monotonic() - t0)
        return replace(result, wall_s=time.monotonic() - t0, notes=notes)

    def _run(self, spec: TrialSpec, trial_dir: Path, progress: ProgressFn) -> TrialResult:
        phases: dict[str, float] = {}  # where a trial's wall time goes, s (reported as metrics)
        t_phase = time.monotonic()
        self._set_mps(spec.policy.mps)
        server = None
        if spec.serves:
            progress(0.0, "starting the vLLM server" if self.keeper.server is None else "checking the vLLM server")
            server = self._server(spec)
            if self.keeper.last_decision is not Decision.KEEP:
                progress(0.0, "warming up the vLLM server")
                _warm_up(server, spec)
        phases["phase_server_s"] = time.monotonic() - t_phase  # check, (re)start, warm-up
        channel = Channel.create() if spec.serves and spec.trains else None
        trainer = None
        try:
            if spec.trains:
                progress(0.0, "starting the trainer")
                t_phase = time.monotonic()
                trainer = self._start_trainer(spec, trial_dir, channel.name if channel else None)
                phases["phase_trainer_start_s"] = time.monotonic() - t_phase
            if server is not None:
                from autotune.gpu.loadgen import replay_sync

                progress(0.0, f"replaying {len(spec.workload)} requests")
                server.save_metrics(trial_dir / "server-metrics-before.prom")
                replayed = replay_sync(
                    server.url, spec.workload, model_name=spec.model.name, vocab_size=spec.model.vocab_size,
                    seed=prompt_seed(spec), channel=channel, policy=spec.policy if spec.trains else None,
                    progress=lambda f: progress(f, f"{f:.0%} of requests done"),
                    prompt_as_text=server.config.has_tokenizer,
                )
                start_s, end_s = replayed.window_start_s, replayed.window_end_s
                server.save_metrics(trial_dir / "server-metrics-after.prom")
                phases["phase_replay_s"] = end_s - start_s
                # after the last arrival, until the last request finished
                phases["phase_drain_s"] = end_s - (start_s + spec.workload.requests[-1].arrival_s)
                if not server.is_alive():
                    raise TrialCrash(f"vLLM server died during the trial (log: {server.log_path})")
            else:
                start_s = time.time()
                while time.time() - start_s < TRAINER_ALONE_WINDOW_S:
                    _check_ranks(trainer, trial_dir)
                    progress((time.time() - start_s) / TRAINER_ALONE_WINDOW_S, "trainer alone")
                    time.sleep(0.5)
                end_s = time.time()
            if trainer is not None:
                _check_ranks(trainer, trial_dir)
                t_phase = time.monotonic()
                self._stop_trainer(trainer, channel, trial_dir)
                phases["phase_trainer_stop_s"] = time.monotonic() - t_phase
                trainer = None
        finally:
            if trainer is not None:  # a crash or Ctrl-C: the other ranks may wait in a collective
                trainer.kill()
            if channel is not None:
                channel.close()
                channel.unlink()

        serving = None
        if server is not None:
            serving = serving_metrics(replayed.records)
            _write_records(trial_dir / "requests.jsonl", replayed.records)
        peft = None
        if spec.trains:
            peft = peft_metrics(read_iteration_log(trial_dir / "iterations.jsonl"), start_s, end_s)
        extra = {"server_startup_s": server.startup_s} if server is not None and server.startup_s else {}
        return TrialResult(serving=serving, peft=peft, extra={**extra, **phases})

    def close(self) -> None:
        self.keeper.stop()
        self.procs.close()  # trainers, the server, then the MPS daemon
        if self._mps is not None:
            shutil.rmtree(self._mps.pipe_dir.parent, ignore_errors=True)
            self._mps = None


def _finetune_inputs(finetune_data: Path | None, model_path: Path | None) -> tuple[Path | None, Path | None]:
    """(data, tokenizer) for the trainer: ``--finetune-data`` with ``--model
    PATH``'s tokenizer.json, both read and checked now (UserError), or (None,
    None): synthetic token ids."""
    if finetune_data is None:
        return None, None
    tokenizer = model_tokenizer(model_path)
    load_alpaca(finetune_data)
    load_tokenizer(tokenizer)
    return Path(finetune_data).resolve(), tokenizer.resolve()


WARM_UP_S = 10.0  # traffic replayed to a new server before it is measured


def prompt_seed(spec: TrialSpec, *, warm_up: bool = False) -> int:
    """The seed of a run's prompt token ids, in [0, 2**63).

    ``spec.seed`` alone repeats prompts across runs (a study gives trial n
    ``seed + n`` and its serving-alone reference ``seed``: trial 0 replayed the
    reference's prompts), and a server with prefix caching on would answer the
    repeat from its cache. Hashing everything that names the run (kind, seed,
    number, label), and a tag for the warm-up, gives each run prompts of its
    own; the workload's arrivals and lengths are untouched."""
    name = ["warm-up" if warm_up else "run", spec.kind.value, spec.seed, spec.number, spec.label]
    digest = hashlib.sha256(json.dumps(name).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cpu_model() -> str:
    """The host CPU's model name (Linux), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _warm_up(server, spec: TrialSpec) -> None:
    """Traffic to a new server before it is measured, so that first-request
    costs (lazy allocations, adapter loading, cold caches) stay out of the
    trials: the first ``WARM_UP_S`` seconds of the trial's own workload, with
    other prompts, plus one request per adapter. Results are dropped."""
    from autotune.gpu.loadgen import replay_sync

    reqs = [r for r in spec.workload.requests if r.arrival_s < WARM_UP_S]
    if spec.lora_serving is not None:
        reqs += [RequestSpec(0.0, 64, 8, adapter=i) for i in range(spec.lora_serving.num_adapters)]
    reqs.sort(key=lambda r: r.arrival_s)
    replay_sync(server.url, Workload(tuple(reqs), spec.workload.rate_req_s, spec.seed, True, "warm-up"),
                model_name=spec.model.name, vocab_size=spec.model.vocab_size, seed=prompt_seed(spec, warm_up=True),
                prompt_as_text=server.config.has_tokenizer)


def _status(trial_dir: Path, rank: int = 0) -> dict[str, Any]:
    try:
        return json.loads(Path(rank_path(trial_dir / "trainer-status.json", rank)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_ranks(ranks, trial_dir: Path) -> None:
    """A TrialCrash, with the reason, if any rank of the trainer has ended."""
    first = ranks.first_exit()
    if first is not None:
        raise TrialCrash(_trainer_failure(first[1], trial_dir, first[0], ranks.world_size))


def _trainer_failure(code: int | None, trial_dir: Path, rank: int = 0, world_size: int = 1) -> str:
    """Why rank ``rank`` of the trainer ended, from its status file."""
    status = _status(trial_dir, rank)
    who = "trainer" if world_size == 1 else f"trainer rank {rank}"
    if code == EXIT_OOM or status.get("state") == "oom":
        message = status.get("message", "trainer out of memory")
        return message if world_size == 1 else f"rank {rank}: {message}"
    message = status.get("message") or "see its log"
    return f"{who} exited with code {code}: {message} (log: {trial_dir / rank_log_name(rank, world_size)})"


def _write_records(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
