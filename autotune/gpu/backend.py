"""``--backend gpu``: each trial for real on the local NVIDIA GPU.

The parts: a stock vLLM OpenAI server (kept across trials while its flags do
not change), one LoRA trainer process built with torchtune's model builders
whose step runs as tasklets, the load generator, and a shared-memory channel
between load generator and trainer. A system's ``SharingPolicy`` decides the
MPS daemon and the trainer's MPS share, its sequence length, where it may stop
and how long it waits, and the load generator's deferral gate.

A trial: server ready -> trainer started and warmed up (its first steps are
not counted) -> workload replayed -> trainer stopped -> metrics. Every child
runs in its own process group, owned by a ``ProcessRegistry``: nothing is left
after a trial, a crash or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from autotune.backends._base import Backend, ProgressFn, no_progress
from autotune.errors import TrialCrash, UserError
from autotune.metrics import peft_metrics, serving_metrics
from autotune.models import ModelConfig
from autotune.policy import Preemption, SharingPolicy
from autotune.trial import TrialKind, TrialResult, TrialSpec

TRAINER_READY_TIMEOUT_S = 600.0  # build, load and warm up the trainer
TRAINER_STOP_TIMEOUT_S = 60.0  # a step of a large model, then exit
TRAINER_ALONE_WINDOW_S = 30.0  # measurement window of trainer-alone trials
_POLL_S = 0.1


def gpu_name() -> tuple[str, int]:
    """(name, memory in MiB) of GPU 0, from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        raise UserError("--backend gpu needs an NVIDIA GPU, and nvidia-smi did not answer") from None
    name, mem = out.splitlines()[0].rsplit(",", 1)
    return name.strip(), int(float(mem))


def hardware_profile(name: str, memory_mib: int) -> str:
    """A short profile name: "NVIDIA H100 80GB HBM3" -> "h100-80gb"."""
    gb = round(memory_mib / 1024)
    short = name.replace("NVIDIA", "").replace("GeForce", "")
    model = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", short)
    slug = (model.group(1) if model else re.sub(r"\W+", "-", short).strip("-")).lower()
    return f"{slug}-{gb}gb" if gb else slug


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self, runs_dir: Path = Path("autotune-runs"), use_mps: bool = True,
                 vllm_args: tuple[str, ...] = (), model_path: Path | None = None,
                 finetune_data: Path | None = None, trainer_warmup_steps: int = 5,
                 server_startup_timeout_s: float = 900.0) -> None:
        try:
            import aiohttp  # noqa: F401
            import vllm  # noqa: F401
        except ImportError as e:
            raise UserError(f"--backend gpu needs vLLM and the GPU extras ({e.name} is missing): "
                            "pip install 'autotune[gpu]'") from None
        if finetune_data is not None:
            raise UserError("--finetune-data is not supported yet: the trainer uses synthetic token ids")
        from autotune.gpu.procs import ProcessRegistry
        from autotune.gpu.server import ServerKeeper

        self._gpu, self._gpu_mem_mib = gpu_name()
        self.root = Path(runs_dir) / "gpu" / time.strftime("%Y%m%d-%H%M%S")
        self.root.mkdir(parents=True, exist_ok=True)
        self.use_mps = use_mps
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
        return hardware_profile(self._gpu, self._gpu_mem_mib)

    def cache_key(self) -> str:
        return f"gpu:{self._gpu}"

    def describe(self) -> dict[str, Any]:
        import torch
        import vllm

        return {
            "backend": self.name,
            "hardware": self.hardware,
            "gpu": self._gpu,
            "gpu_memory_mib": self._gpu_mem_mib,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "mps": self.use_mps,
            "vllm_args": list(self.vllm_args),
            "run_dir": str(self.root),
        }

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
            from autotune.gpu.mps import MpsDaemon

            # Short paths: the daemon's pipe is a Unix socket (108-byte limit).
            base = Path(f"/tmp/autotune-mps-{os.getpid()}")
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

    def _server(self, spec: TrialSpec):
        from autotune.gpu.modelfiles import write_lora_adapters
        from autotune.gpu.server import ServerConfig

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
            gpu_memory_utilization=spec.policy.gpu_memory_utilization, lora_modules=lora,
            max_lora_rank=rank, extra_args=self.vllm_args,
            env=tuple(sorted(self._mps.env().items())) if self._mps is not None else (),
        )
        return self.keeper.ensure(config)

    def _start_trainer(self, spec: TrialSpec, trial_dir: Path, channel_name: str | None):
        from autotune.gpu.trainer import TrainerConfig, trainer_command

        policy = spec.policy
        if spec.kind is TrialKind.TRAINER_ALONE and policy.preemption is Preemption.ITERATION:
            policy = replace(policy, preemption=Preemption.NONE)  # nothing to wait for
        config = TrainerConfig(
            model=str(self.model_path) if self.model_path is not None else spec.model.name,
            policy=policy.to_dict(), iteration_log=str(trial_dir / "iterations.jsonl"),
            status_path=str(trial_dir / "trainer-status.json"), lora_rank=spec.trainer_lora_rank,
            channel=channel_name, seed=spec.seed, warmup_steps=self.warmup_steps,
        )
        config.write(trial_dir / "trainer-config.json")
        env = dict(os.environ)
        if self._mps is not None:
            pct = policy.trainer_mps_active_thread_pct
            env.update(self._mps.env_for_client(pct if pct < 100 else None))
        proc = self.procs.start(trainer_command(trial_dir / "trainer-config.json"), trial_dir / "trainer.log",
                                env=env, grace_s=TRAINER_STOP_TIMEOUT_S)
        deadline = time.monotonic() + TRAINER_READY_TIMEOUT_S
        while _status(trial_dir).get("state") != "ready":
            if proc.poll() is not None:
                raise TrialCrash(_trainer_failure(proc.returncode, trial_dir))
            if time.monotonic() > deadline:
                raise TrialCrash(f"trainer not ready within {TRAINER_READY_TIMEOUT_S:g} s")
            time.sleep(_POLL_S)
        return proc

    def _stop_trainer(self, proc, channel, trial_dir: Path) -> None:
        if channel is not None:
            channel.request_stop()
        else:
            proc.terminate()  # SIGTERM: the trainer stops between steps
        try:
            code = proc.wait(timeout=TRAINER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        self.procs.terminate(proc)
        if code not in (0, None, -15):
            raise TrialCrash(_trainer_failure(code, trial_dir))

    # ------------------------------------------------------------ a trial

    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        t0 = time.monotonic()
        self._trials += 1
        label = f"trial-{spec.number}" if spec.number is not None else f"{spec.kind.value}-{self._trials}"
        trial_dir = self.root / label
        trial_dir.mkdir(parents=True, exist_ok=True)
        notes = () if self.use_mps or not spec.policy.mps else ("MPS off (--no-mps)",)
        try:
            result = self._run(spec, trial_dir, progress)
        except TrialCrash as e:
            return TrialResult.crash(str(e), wall_s=time.monotonic() - t0)
        return replace(result, wall_s=time.monotonic() - t0, notes=notes)

    def _run(self, spec: TrialSpec, trial_dir: Path, progress: ProgressFn) -> TrialResult:
        from autotune.gpu.channel import Channel
        from autotune.gpu.server import Decision

        self._set_mps(spec.policy.mps)
        server = None
        if spec.serves:
            progress(0.0, "starting the vLLM server" if self.keeper.server is None else "checking the vLLM server")
            server = self._server(spec)
            if self.keeper.last_decision is not Decision.KEEP:
                progress(0.0, "warming up the vLLM server")
                _warm_up(server, spec)
        channel = Channel.create() if spec.serves and spec.trains else None
        trainer = None
        try:
            if spec.trains:
                progress(0.0, "starting the trainer")
                trainer = self._start_trainer(spec, trial_dir, channel.name if channel else None)
            if server is not None:
                from autotune.gpu.loadgen import replay_sync

                progress(0.0, f"replaying {len(spec.workload)} requests")
                replayed = replay_sync(
                    server.url, spec.workload, model_name=spec.model.name, vocab_size=spec.model.vocab_size,
                    seed=spec.seed, channel=channel, policy=spec.policy if spec.trains else None,
                    progress=lambda f: progress(f, f"{f:.0%} of requests done"),
                    prompt_as_text=server.config.has_tokenizer,
                )
                start_s, end_s = replayed.window_start_s, replayed.window_end_s
                if not server.is_alive():
                    raise TrialCrash(f"vLLM server died during the trial (log: {server.log_path})")
            else:
                start_s = time.time()
                while time.time() - start_s < TRAINER_ALONE_WINDOW_S:
                    if trainer.poll() is not None:
                        raise TrialCrash(_trainer_failure(trainer.returncode, trial_dir))
                    progress((time.time() - start_s) / TRAINER_ALONE_WINDOW_S, "trainer alone")
                    time.sleep(0.5)
                end_s = time.time()
            if trainer is not None:
                if trainer.poll() is not None:
                    raise TrialCrash(_trainer_failure(trainer.returncode, trial_dir))
                self._stop_trainer(trainer, channel, trial_dir)
                trainer = None
        finally:
            if trainer is not None:
                self.procs.terminate(trainer)
            if channel is not None:
                channel.close()
                channel.unlink()

        serving = None
        if server is not None:
            serving = serving_metrics(replayed.records)
            _write_records(trial_dir / "requests.jsonl", replayed.records)
        peft = None
        if spec.trains:
            from autotune.gpu.trainer import read_iteration_log

            peft = peft_metrics(read_iteration_log(trial_dir / "iterations.jsonl"), start_s, end_s)
        extra = {"server_startup_s": server.startup_s} if server is not None and server.startup_s else {}
        return TrialResult(serving=serving, peft=peft, extra=extra)

    def close(self) -> None:
        self.keeper.stop()
        self.procs.close()  # trainers, the server, then the MPS daemon
        if self._mps is not None:
            shutil.rmtree(self._mps.pipe_dir.parent, ignore_errors=True)
            self._mps = None


WARM_UP_S = 10.0  # traffic replayed to a new server before it is measured


def _warm_up(server, spec: TrialSpec) -> None:
    """Traffic to a new server before it is measured, so that first-request
    costs (lazy allocations, adapter loading, cold caches) stay out of the
    trials: the first ``WARM_UP_S`` seconds of the trial's own workload, with
    other prompts, plus one request per adapter. Results are dropped."""
    from autotune.gpu.loadgen import replay_sync
    from autotune.workloads.spec import RequestSpec, Workload

    reqs = [r for r in spec.workload.requests if r.arrival_s < WARM_UP_S]
    if spec.lora_serving is not None:
        reqs += [RequestSpec(0.0, 64, 8, adapter=i) for i in range(spec.lora_serving.num_adapters)]
    reqs.sort(key=lambda r: r.arrival_s)
    replay_sync(server.url, Workload(tuple(reqs), spec.workload.rate_req_s, spec.seed, True, "warm-up"),
                model_name=spec.model.name, vocab_size=spec.model.vocab_size, seed=spec.seed + 7919,
                prompt_as_text=server.config.has_tokenizer)


def _status(trial_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((trial_dir / "trainer-status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _trainer_failure(code: int | None, trial_dir: Path) -> str:
    from autotune.gpu.trainer import EXIT_OOM

    status = _status(trial_dir)
    if code == EXIT_OOM or status.get("state") == "oom":
        return status.get("message", "trainer out of memory")
    message = status.get("message") or "see its log"
    return f"trainer exited with code {code}: {message} (log: {trial_dir / 'trainer.log'})"


def _write_records(path: Path, records) -> None:
    from dataclasses import asdict

    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
