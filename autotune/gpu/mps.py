"""The NVIDIA MPS control daemon, with its own pipe and log folders.

Its own folders keep it apart from any daemon the machine already runs. Every
process that should share the GPU through it (the vLLM server, the trainer)
gets the same folders in its environment; the trainer also gets
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (vllm-torchtune's knob). Start the daemon
before those processes and quit it after they have ended.

One daemon serves every GPU visible to it, so with ``--gpus N`` the one
daemon covers the server's N tensor-parallel workers and the N trainer ranks:
it inherits the backend's environment (its ``CUDA_VISIBLE_DEVICES``, if any,
is the clients' too), and every client gets the same pipe and log folders.
The thread percentage applies to each trainer rank on its own GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from autotune.errors import UserError

#: runner(argv, env, stdin text or None) -> (exit code, output)
Runner = Callable[[Sequence[str], Mapping[str, str], str | None], tuple[int, str]]

CONTROL_BINARY = "nvidia-cuda-mps-control"
_NO_MPS_HINT = "run with --no-mps to share the GPU without MPS"


def run_command(argv: Sequence[str], env: Mapping[str, str], stdin: str | None) -> tuple[int, str]:
    """The real runner: run to completion, output captured."""
    done = subprocess.run(list(argv), env=dict(env), input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()


class MpsDaemon:
    def __init__(self, pipe_dir: Path, log_dir: Path, *, runner: Runner = run_command,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        self.pipe_dir = Path(pipe_dir)
        self.log_dir = Path(log_dir)
        self._runner = runner
        self._which = which
        self.running = False

    def env(self) -> dict[str, str]:
        """The variables that point a process at this daemon."""
        return {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def env_for_client(self, active_thread_pct: int | None) -> dict[str, str]:
        """Environment additions for a client; ``active_thread_pct`` (1..100)
        caps the share of SMs its kernels may use, None leaves it uncapped."""
        env = self.env()
        if active_thread_pct is not None:
            assert 1 <= active_thread_pct <= 100, active_thread_pct
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(active_thread_pct)
        return env

    def _control(self, stdin: str | None, *args: str) -> tuple[int, str]:
        binary = self._which(CONTROL_BINARY)
        if binary is None:
            raise UserError(f"{CONTROL_BINARY} not found on PATH, so MPS cannot start; {_NO_MPS_HINT}")
        return self._runner([binary, *args], {**os.environ, **self.env()}, stdin)

    def start(self) -> None:
        """``nvidia-cuda-mps-control -d`` (it daemonizes and returns)."""
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        code, output = self._control(None, "-d")
        if code != 0:
            detail = " ".join(output.split())[:200] or "no output"
            raise UserError(f"the MPS control daemon did not start (exit code {code}: {detail}; "
                            f"logs in {self.log_dir}); {_NO_MPS_HINT}")
        self.running = True

    def stop(self) -> None:
        """``echo quit | nvidia-cuda-mps-control``; does nothing if not running."""
        if not self.running:
            return
        self.running = False
        self._control("quit\n")

    def __enter__(self) -> MpsDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
