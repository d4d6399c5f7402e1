"""The trainer over N GPUs: one process per GPU, FSDP2, one decision for all.

``--gpus N`` runs the LoRA trainer as N processes (ranks), rank r on GPU r, as
torchtune's distributed LoRA recipe does (global batch = N samples of one each):

- **Launch.** ``TrainerRanks`` starts the N ranks itself, no torchrun: each gets
  ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``
  and ``LOCAL_RANK`` (``rank_env``), runs in its own process group of the
  backend's ``ProcessRegistry`` and logs to ``trainer-rank{r}.log``. All GPUs
  stay visible to every rank; a rank picks its GPU with
  ``torch.cuda.set_device(LOCAL_RANK)``, so the trainer uses GPUs 0..N-1, the
  same ones as the server's tensor parallel N. With N = 1 nothing of this
  happens: one process, no environment added, no process group.
- **Sharding.** ``build_sharded_model``: the torchtune model is built on the
  meta device, every decoder layer is one FSDP2 unit (``fully_shard``) and the
  root holds the rest (embeddings, final norm, output); then the shards are
  materialised on the rank's device. The tasklet step calls the layers one by
  one, so FSDP2 all-gathers a layer's weights at its forward (and again at its
  recomputation in backward) and reduce-scatters its LoRA gradients (averaged
  over ranks) after its backward; ``autotune.gpu.tasklets`` unshards the root
  around the embeddings and the head. Collectives: NCCL on CUDA, gloo on CPU.
- **One decision.** Every collective must be entered by every rank in the same
  order, so all ranks must decide alike where to pause, whether to start an
  iteration and when to stop; otherwise a rank waits in an all-gather that the
  others never join. ``SharedChannel`` makes each read of the channel one
  tiny all-reduce (MAX of one int64): only rank 0 attaches the shared-memory
  channel (it stays its flag's single writer) and contributes the requests in
  flight; the others contribute 0. A stop asked of any rank (SIGTERM) or of
  rank 0 through the channel stops all at the same step. The ranks reach the
  same pause points (same knobs, same layers), make the same reads, and so
  get the same answers.
- **Outputs.** Rank 0 alone writes the iteration log (tokens = N x seq_len per
  step: PEFT throughput counts every rank's samples) and the ready status,
  after a barrier that all ranks reach once built and warmed up. Ranks > 0
  write their own status file (``trainer-status-rank{r}.json``) so that an
  error or out-of-memory on any rank is reported with its reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.gpu.lora_model import build_model
from autotune.gpu.server import free_port
from autotune.policy import SharingPolicy

MASTER_ADDR = "127.0.0.1"
#: The trainer processes' exit codes besides 0 (a clean stop), which the launcher and the backend read.
EXIT_ERROR = 1
EXIT_OOM = 3  # out of GPU memory: the backend records "trainer out of memory"


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands among the trainer's ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU index on this host

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RankInfo:
        """From torchrun's variables; a single process when they are absent."""
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        info = cls(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", str(rank))))
        assert 0 <= info.rank < info.world_size, info
        return info

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_env(base: Mapping[str, str], rank: int, world_size: int, master_port: int,
             master_addr: str = MASTER_ADDR) -> dict[str, str]:
    """The environment of rank ``rank`` (torchrun's variable names)."""
    return {**base, "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}


def rank_path(path: str | Path | None, rank: int) -> str | None:
    """Rank 0 keeps ``path``; rank r > 0 gets ``stem-rank{r}.suffix`` beside it."""
    if path is None or rank == 0:
        return None if path is None else str(path)
    p = Path(path)
    return str(p.with_name(f"{p.stem}-rank{rank}{p.suffix}"))


def rank_log_name(rank: int, world_size: int) -> str:
    return "trainer.log" if world_size == 1 else f"trainer-rank{rank}.log"


# ---------------------------------------------------------------- inside a rank


@contextmanager
def process_group(info: RankInfo, device: str) -> Iterator[str]:
    """Join the ranks' process group (NCCL on CUDA, gloo on CPU); yields this
    rank's device. Left on a normal exit only: after an error the process ends
    and the others are ended by the backend."""
    import torch
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(info.local_rank)
        rank_device = f"cuda:{info.local_rank}"
        dist.init_process_group("nccl", rank=info.rank, world_size=info.world_size,
                                device_id=torch.device(rank_device))
    else:
        rank_device = device
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    yield rank_device
    dist.destroy_process_group()


class SharedChannel:
    """The trainer's channel as every rank sees it: each read is one all-reduce
    (MAX) of one int64, so all ranks get the same answer at the same point.

    Only rank 0 holds the real channel (``channel``; None on the other ranks
    and for the trainer alone); ``stop_signal`` is this rank's own stop flag
    (SIGTERM). Every rank must call the reads in the same order.
    """

    def __init__(self, channel: Any | None, stop_signal: Callable[[], bool], device: str) -> None:
        self._channel = channel
        self._stop_signal = stop_signal
        self._device = device
        self.reads = 0  # all-reduces made

    def _max(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.reads += 1
        return int(t.item())

    def requests_in_flight(self) -> int:
        return self._max(self._channel.requests_in_flight() if self._channel is not None else 0)

    def stop_requested(self) -> bool:
        local = self._stop_signal() or (self._channel is not None and self._channel.stop_requested())
        return self._max(int(local)) != 0

    def set_trainer_in_iteration(self, value: bool) -> None:
        """Rank 0 only writes the flag (its single writer); no collective."""
        if self._channel is not None:
            self._channel.set_trainer_in_iteration(value)

    def enter_iteration(self, policy: SharingPolicy, should_stop: Callable[[], bool],
                        sleep: Callable[[float], None] = time.sleep) -> bool:
        """``trainer.enter_iteration`` for N ranks: the policy's start rule on the shared count.

        Rank 0 makes the single-process handshake on its own channel (flag up,
        read, flag down again if busy) and only then shares its answer. Read
        through ``requests_in_flight``, the flag would stay up across the
        collective while the ranks wait for each other, and the load
        generator's gate would hold requests all that time.
        """
        while True:
            busy = 0
            if self._channel is not None:
                self._channel.set_trainer_in_iteration(True)
                busy = self._channel.requests_in_flight()
                if not policy.trainer_may_start(busy):
                    self._channel.set_trainer_in_iteration(False)
            if policy.trainer_may_start(self._max(busy)):
                return True
            if should_stop():
                return False
            sleep(policy.trainer_poll_s)


def shard_model(model: Any, world_size: int, device_type: str) -> Any:
    """FSDP2 over ``world_size`` ranks: one unit per decoder layer, the root for the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)  # resharded after forward: all-gathered again in backward
    fully_shard(model, mesh=mesh)  # embeddings, final norm, output
    return model


def _local(p: Any) -> Any:
    """A parameter's local shard (a view: writing it writes the parameter)."""
    return p.to_local() if hasattr(p, "to_local") else p


def random_init(model: Any, seed: int, device: str) -> None:
    """Random weights for a materialised sharded model (the same shapes give the
    same speed): norm scales 1, biases and LoRA B 0 (torchtune's LoRA init),
    the rest normal(0, 0.02); each rank draws its shard from its own generator."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = _local(p)
            if name.endswith("scale"):
                local.fill_(1.0)
            elif name.endswith("bias") or "lora_b" in name:
                local.zero_()
            else:
                local.normal_(0.0, 0.02, generator=gen)


def load_full_state(model: Any, state: Mapping[str, Any]) -> list[str]:
    """Copy full (unsharded) tensors into the sharded parameters: each rank
    keeps its own chunk, no communication. Returns the parameters not in ``state``."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in state:
                missing.append(name)
                continue
            full = state[name].to(device=_local(p).device, dtype=p.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            _local(p).copy_(full)
    return missing


def build_sharded_model(cfg: Any, *, seq_len: int, lora_rank: int, lora_alpha: float, device: str, dtype: Any,
                        seed: int, info: RankInfo, full_state: Mapping[str, Any] | None = None) -> Any:
    """``lora_model.build_model``'s model, FSDP2-sharded over the ranks, on ``device``.

    Built on the meta device (no rank ever holds the whole model), sharded,
    then materialised: from ``full_state`` (real weights; LoRA weights missing
    from it are initialised) or random. Must run inside ``process_group``.
    """
    import torch
    from torchtune.training import set_default_dtype

    model = build_model(cfg, seq_len=seq_len, lora_rank=lora_rank, lora_alpha=lora_alpha, device="meta",
                        dtype=dtype, seed=seed)
    shard_model(model, info.world_size, torch.device(device).type)
    model.to_empty(device=device)
    random_init(model, seed + info.rank, device)
    if full_state is not None:
        missing = [n for n in load_full_state(model, full_state) if "lora_" not in n]
        if missing:
            raise UserError(f"weights do not match the model (missing {missing[:3]})")
    with torch.no_grad(), set_default_dtype(dtype), torch.device(device):
        for m in model.modules():  # RoPE caches: buffers, not sharded, built as in build_model
            if hasattr(m, "rope_init"):
                m.rope_init()
        # FSDP2 picks its root at the root module's first forward; the step
        # calls the layers one by one, so one token goes through it all once.
        model(torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()  # the root keeps its weights gathered after a forward
    return model


# ---------------------------------------------------------------- the launcher


class TrainerRanks:
    """The trainer's processes: one, or one per GPU, each in its own process
    group of ``procs`` (a ``ProcessRegistry``), rank r logging to
    ``log_dir / rank_log_name(r, N)``."""

    def __init__(self, procs: Any, argv: Sequence[str], log_dir: Path, env: Mapping[str, str], world_size: int,
                 *, grace_s: float = 60.0, master_port: int | None = None) -> None:
        assert world_size >= 1, world_size
        self._procs = procs
        self._argv = list(argv)
        self.log_dir = Path(log_dir)
        self._env = dict(env)
        self.world_size = world_size
        self._grace_s = grace_s
        self.master_port = master_port
        self.ranks: list[subprocess.Popen[bytes]] = []
        self._exit_order: list[int] = []  # ranks in the order they were seen to exit

    def env(self, rank: int) -> dict[str, str]:
        if self.world_size == 1:
            return dict(self._env)  # one process: no distributed variables at all
        assert self.master_port is not None, "start() picks the port"
        return rank_env(self._env, rank, self.world_size, self.master_port)

    def log_path(self, rank: int) -> Path:
        return self.log_dir / rank_log_name(rank, self.world_size)

    def start(self) -> None:
        if self.world_size > 1 and self.master_port is None:
            self.master_port = free_port(MASTER_ADDR)
        for r in range(self.world_size):
            self.ranks.append(self._procs.start(self._argv, self.log_path(r), env=self.env(r), grace_s=self._grace_s))

    def poll(self) -> None:
        for r, proc in enumerate(self.ranks):
            if proc.poll() is not None and r not in self._exit_order:
                self._exit_order.append(r)

    def first_exit(self) -> tuple[int, int] | None:
        """(rank, exit code) of the rank to blame for an early end: one that
        ran out of memory, else the first seen to exit (the others then fail
        in their collectives); None while all run."""
        self.poll()
        if not self._exit_order:
            return None
        codes = {r: self.ranks[r].returncode for r in self._exit_order}
        oom = [r for r in self._exit_order if codes[r] == EXIT_OOM]
        r = oom[0] if oom else self._exit_order[0]
        return r, codes[r]

    def wait(self, timeout_s: float) -> list[int | None]:
        """Exit codes once all have ended or ``timeout_s`` passed (None: still running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.ranks):
            self.poll()
            time.sleep(0.05)
        self.poll()
        return [p.poll() for p in self.ranks]

    def terminate(self) -> None:
        """SIGTERM (the ranks agree to stop at the next step), SIGKILL after the grace period."""
        for proc in self.ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.wait(self._grace_s)
        self.kill()  # whatever is left

    def kill(self) -> None:
        """SIGKILL every rank's group at once: after one rank failed, the
        others may hang in a collective that will never complete."""
        for proc in self.ranks:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._end_all()

    def _end_all(self) -> None:
        for proc in self.ranks:
            try:
                self._procs.terminate(proc)
            except ValueError:  # ended through the registry already
                pass
