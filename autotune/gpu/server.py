"""A stock vLLM OpenAI server as a child process, kept across trials.

``ServerConfig`` holds everything that fixes the server's command line and
environment; two trials whose configs are equal share one running server.
``ServerKeeper.ensure(config)`` keeps the running server, or (re)starts it when
there is none, its config changed, or it died. The server runs in its own
process group with its output in a log file, and is health-checked
(``/health``, then ``/v1/models`` lists the model and its adapters) before use.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autotune.errors import TrialCrash
from autotune.gpu.procs import ProcessRegistry

STOP_GRACE_S = 30.0  # vLLM shuts its workers down on SIGTERM; SIGKILL after this
_POLL_S = 1.0  # health-check interval during start-up
# vLLM 0.20's switch (EngineArgs.enable_prefix_caching, a BooleanOptionalAction)
PREFIX_CACHING_ON = "--enable-prefix-caching"
PREFIX_CACHING_OFF = "--no-enable-prefix-caching"


def prefix_caching_in(args: Sequence[str]) -> bool | None:
    """The prefix-caching choice ``args`` make (the last switch wins, as in
    argparse; vLLM also accepts underscores), or None if they make none."""
    choice = None
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = "--" + arg[2:].split("=", 1)[0].replace("_", "-")
        if name == PREFIX_CACHING_ON:
            choice = True
        elif name == PREFIX_CACHING_OFF:
            choice = False
    return choice


@dataclass(frozen=True)
class ServerConfig:
    model: str  # folder: a preset's config folder (with dummy_weights) or real weights
    served_model_name: str  # the ``model`` field of base-model requests
    dummy_weights: bool  # --load-format dummy (random weights of the right shapes)
    has_tokenizer: bool  # the folder holds a tokenizer; else --skip-tokenizer-init
    tensor_parallel_size: int = 1  # GPUs
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take
    max_model_len: int = 2048  # tokens
    lora_modules: tuple[tuple[str, str], ...] = ()  # (adapter name, PEFT folder), fig13
    max_lora_rank: int = 0  # needed with lora_modules
    extra_args: tuple[str, ...] = ()  # the user's --vllm-arg flags, passed through
    # vLLM 0.20 caches prefixes by default, so one run could hit blocks another
    # left behind; off unless asked for (a switch in extra_args wins)
    enable_prefix_caching: bool = False
    env: tuple[tuple[str, str], ...] = ()  # added to the environment (MPS pipe folders)
    host: str = "127.0.0.1"
    port: int | None = field(default=None, compare=False)  # None: a free port at start

    def __post_init__(self) -> None:
        assert self.tensor_parallel_size >= 1, self.tensor_parallel_size
        assert 0.0 < self.gpu_memory_utilization <= 1.0, self.gpu_memory_utilization
        assert not self.lora_modules or self.max_lora_rank >= 1, "LoRA serving needs max_lora_rank"

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.lora_modules)

    @property
    def prefix_caching(self) -> bool:
        """Whether the server runs with prefix caching: the user's switch if
        ``extra_args`` carry one, else ``enable_prefix_caching``."""
        user = prefix_caching_in(self.extra_args)
        return self.enable_prefix_caching if user is None else user

    def command(self, port: int, python: str = sys.executable) -> list[str]:
        """The server's command line (vLLM 0.20 flag names)."""
        argv = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(port),
            "--max-model-len", str(self.max_model_len),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}",
            "--no-enable-log-requests",
        ]
        if prefix_caching_in(self.extra_args) is None:  # the user's own switch wins
            argv.append(PREFIX_CACHING_ON if self.enable_prefix_caching else PREFIX_CACHING_OFF)
        if self.dummy_weights:
            argv += ["--load-format", "dummy"]
        if not self.has_tokenizer:
            argv += ["--skip-tokenizer-init"]
        if self.lora_modules:
            argv += ["--enable-lora", "--max-loras", str(len(self.lora_modules)),
                     "--max-lora-rank", str(self.max_lora_rank),
                     "--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules)]
        return argv + list(self.extra_args)

    def flags(self) -> list[str]:
        """The command's flags as the results record them: without the python
        executable and module, and without ``--port`` and ``--model`` (with
        their values), which change from machine to machine."""
        argv = self.command(port=0)[3:]
        for flag in ("--model", "--port"):
            i = argv.index(flag)
            del argv[i:i + 2]
        return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout_s: float = 2.0) -> object | None:
    """The JSON body of a 200 answer; None for any other answer or none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read()
            return json.loads(body) if body.strip() else {}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class VllmServer:
    """One server process. ``argv`` replaces the vLLM command line (tests)."""

    def __init__(self, config: ServerConfig, log_path: Path, procs: ProcessRegistry, *,
                 startup_timeout_s: float = 900.0, argv: Sequence[str] | None = None) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self._procs = procs
        self._startup_timeout_s = startup_timeout_s
        self._argv = argv
        self.port = config.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # start to healthy, s

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def save_metrics(self, path: Path, timeout_s: float = 5.0) -> bool:
        """vLLM's own Prometheus counters and histograms (queue time, prefill,
        TTFT as the engine sees it) into ``path``; a snapshot before and one
        after a trial tell the engine's share of the client's latency from
        the API server's. A diagnostic: False, and nothing written, if the
        server does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout_s) as resp:
                body = resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False
        path.write_bytes(body)
        return True

    def start(self) -> None:
        """Start and wait until healthy; a TrialCrash (and nothing left running) if not."""
        if self.port is None:
            self.port = free_port(self.config.host)
        argv = list(self._argv) if self._argv is not None else self.config.command(self.port)
        t0 = time.monotonic()
        self.proc = self._procs.start(argv, self.log_path, env={**os.environ, **dict(self.config.env)},
                                      grace_s=STOP_GRACE_S)
        try:
            self._wait_ready(t0 + self._startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        expected = {self.config.served_model_name, *self.config.adapter_names}
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise TrialCrash(f"vLLM server exited with code {self.proc.returncode} during start-up: "
                                 f"{_last_line(self.log_path)} (log: {self.log_path})")
            if _get_json(f"{self.url}/health") is not None:
                models = _get_json(f"{self.url}/v1/models")
                served = {m.get("id") for m in models.get("data", [])} if isinstance(models, dict) else set()
                if expected <= served:
                    return
            if time.monotonic() >= deadline:
                raise TrialCrash(f"vLLM server not ready within {self._startup_timeout_s:g} s "
                                 f"(log: {self.log_path})")
            time.sleep(_POLL_S)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """Alive and answering ``/health``."""
        return self.is_alive() and _get_json(f"{self.url}/health") is not None

    def stop(self) -> None:
        """End the server's whole process group (SIGTERM, SIGKILL after a grace period)."""
        if self.proc is not None:
            try:
                self._procs.terminate(self.proc)
            except ValueError:  # the registry ended it already
                pass
        self.proc = None


class Decision(str, enum.Enum):
    KEEP = "keep"
    START = "start"  # none running
    RESTART_CHANGED = "restart: server flags changed"
    RESTART_DIED = "restart: server died"


def decide(running: VllmServer | None, config: ServerConfig) -> Decision:
    """Whether the running server can serve a trial that needs ``config``."""
    if running is None:
        return Decision.START
    if running.config != config:
        return Decision.RESTART_CHANGED
    if not running.is_alive():
        return Decision.RESTART_DIED
    return Decision.KEEP


ServerFactory = Callable[[ServerConfig, Path], VllmServer]


class ServerKeeper:
    """Keeps at most one server across trials; logs go to ``log_dir/vllm-server-N.log``."""

    def __init__(self, log_dir: Path, procs: ProcessRegistry, *, startup_timeout_s: float = 900.0,
                 factory: ServerFactory | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._factory = factory or (lambda cfg, log: VllmServer(cfg, log, procs,
                                                                startup_timeout_s=startup_timeout_s))
        self.server: VllmServer | None = None
        self.starts = 0  # servers started so far
        self.last_decision: Decision | None = None
        self.last_started: ServerConfig | None = None  # kept after stop(): what the results record

    def ensure(self, config: ServerConfig) -> VllmServer:
        """A healthy server for ``config``: the running one, or a new one."""
        decision = decide(self.server, config)
        self.last_decision = decision
        if decision is Decision.KEEP:
            assert self.server is not None
            return self.server
        self.stop()
        self.starts += 1
        server = self._factory(config, self.log_dir / f"vllm-server-{self.starts}.log")
        self.last_started = config
        server.start()
        self.server = server
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
