"""The GPU backend's LoRA trainer: one process fine-tuning beside the server.

    python -m autotune.gpu.trainer --config CONFIG.json

The model (``autotune.gpu.lora_model``) is built with torchtune's model builders for any preset (random
weights: the same shapes give the same speed) or a local Hugging Face folder
(its ``*.safetensors`` loaded when present): LoRA rank 8 / alpha 16 on q, k and
v only, base frozen, bf16 on CUDA, batch 1 of ``seq_len_tokens`` token ids
(synthetic, or an Alpaca-format file packed to that length with a real
tokenizer: ``finetune_data``, ``autotune.gpu.finetune_data``), AdamW lr 3e-4
over the LoRA weights, per-layer activation checkpointing. Each step runs as
tasklets (``autotune.gpu.tasklets``); the sharing policy
(``autotune.policy``) says where the trainer may stop for inference:

- its pause plan (LLMStation): pause points between tasklets. Without a
  channel (the trainer alone, fig12) the checks still run and never wait;
- ``trainer_may_start`` (``enter_iteration``): under an arrival gate
  (FineInfer) no iteration starts while requests are in flight, polling every
  ``arrival_gate.poll_s``;
- otherwise it runs freely (its MPS share comes from the environment,
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, set by whoever launches it).

Started with torchrun's variables (``WORLD_SIZE`` > 1, as the backend's
``--gpus N`` does), it is one rank of N: the model is FSDP2-sharded, every
rank trains its own sample of ``seq_len_tokens`` (global batch N), and all
ranks share each policy decision; see ``autotune.gpu.distributed``.

Outputs, all optional paths from the config:
- iteration log: JSON lines, one per finished step after warm-up,
  ``{"start_s", "end_s", "tokens", "loss"}`` on the ``time.time()`` clock
  (shared with the load generator in another process);
- status file: JSON, ``{"state": "starting"|"ready"|"stopped"|"oom"|"error", ...}``;
- stdout: ``READY_LINE`` once warm-up is done.
Runs until the channel's stop flag, SIGTERM/SIGINT, or ``max_steps``.
Exit codes: 0 clean stop, ``EXIT_OOM`` (3) out of GPU memory, 1 other errors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from autotune.errors import UserError
from autotune.gpu.channel import Channel
from autotune.gpu.distributed import (EXIT_ERROR, EXIT_OOM, RankInfo, SharedChannel, build_sharded_model, process_group,
                                      rank_path)
from autotune.gpu.finetune_data import finetune_batches
from autotune.gpu.lora_model import build_model, hf_state_dict, load_hf_weights, model_config
from autotune.metrics import TrainerIteration
from autotune.policy import SharingPolicy

READY_LINE = "autotune-trainer: ready"


class TrainerChannel(Protocol):
    """What the trainer uses of ``autotune.gpu.channel.Channel``."""

    def requests_in_flight(self) -> int: ...
    def set_trainer_in_iteration(self, value: bool) -> None: ...
    def stop_requested(self) -> bool: ...


@dataclass(frozen=True)
class TrainerConfig:
    model: str  # a preset name (autotune.models.PRESETS) or a local model folder
    policy: dict[str, Any]  # SharingPolicy.to_dict()
    iteration_log: str | None = None  # JSON lines path
    status_path: str | None = None  # JSON path
    seq_len_tokens: int | None = None  # None: policy.trainer_seq_len_tokens
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 3e-4
    channel: str | None = None  # shared-memory channel name; None: the trainer alone
    seed: int = 0
    device: str = "cuda"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    warmup_steps: int = 2  # steps before the ready marker, not logged
    max_steps: int | None = None  # logged steps before stopping; None: until asked
    memory_fraction: float | None = None  # CUDA: set_per_process_memory_fraction of each GPU; None: no cap
    finetune_data: str | None = None  # Alpaca-format JSON (autotune.gpu.finetune_data); None: synthetic ids
    tokenizer: str | None = None  # tokenizer.json or its folder; needed with finetune_data

    def sharing_policy(self) -> SharingPolicy:
        return SharingPolicy.from_dict(self.policy)

    def seq_len(self) -> int:
        return self.seq_len_tokens or self.sharing_policy().trainer_seq_len_tokens

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> TrainerConfig:
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"bad trainer config {path}: {e}") from None


def trainer_command(config_path: str | Path) -> list[str]:
    """The command line that starts the trainer process."""
    return [sys.executable, "-m", "autotune.gpu.trainer", "--config", str(config_path)]


def synthetic_batches(vocab_size: int, seq_len: int, seed: int, device: str) -> Iterator[tuple[Any, Any]]:
    """Endless (tokens, labels), each [1, seq_len] random token ids, labels shifted by one."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab_size, (1, seq_len + 1), generator=gen).to(device)  # [1, S+1]
        yield ids[:, :-1], ids[:, 1:]


def training_batches(config: TrainerConfig, vocab_size: int, seq_len: int, device: str, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[Any, Any]]:
    """The trainer's endless (tokens, labels), each [1, seq_len]: the config's
    fine-tuning data (rank r of N takes its own shard), else synthetic ids
    seeded ``seed + rank``. Data and tokenizer are checked here (UserError)."""
    if config.finetune_data is None:
        return synthetic_batches(vocab_size, seq_len, config.seed + rank, device)
    if config.tokenizer is None:
        raise UserError("finetune_data needs a tokenizer (tokenizer.json or its folder)")
    return finetune_batches(config.finetune_data, config.tokenizer, seq_len=seq_len, seed=config.seed,
                            device=device, vocab_size=vocab_size, rank=rank, world_size=world_size)


# ---------------------------------------------------------------- the loop


def enter_iteration(
    channel: TrainerChannel, policy: SharingPolicy, should_stop: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Mark the trainer inside an iteration once the policy lets it start
    (at once, or under an arrival gate once no request is in flight, polling
    every ``trainer_poll_s``); False if asked to stop while waiting.

    The flag goes up before the check: the load generator counts a request in
    flight before it reads the flag, so one of the two always sees the other.
    """
    while True:
        channel.set_trainer_in_iteration(True)
        if policy.trainer_may_start(channel.requests_in_flight()):
            return True
        channel.set_trainer_in_iteration(False)
        if should_stop():
            return False
        sleep(policy.trainer_poll_s)


def iteration_record(start_s: float, end_s: float, tokens: int, loss: float) -> str:
    return json.dumps({"start_s": start_s, "end_s": end_s, "tokens": tokens, "loss": loss})


def read_iteration_log(path: str | Path) -> list[TrainerIteration]:
    """The logged steps; a last line cut short by a kill is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append(TrainerIteration(start_s=float(d["start_s"]), end_s=float(d["end_s"]), tokens=int(d["tokens"])))
    return out


def write_status(path: str | None, state: str, **info: Any) -> None:
    if path is None:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"state": state, "time_s": time.time(), **info}), encoding="utf-8")
    os.replace(tmp, path)


class _NoChannel:
    """The trainer alone: no requests ever, never asked to stop."""

    def requests_in_flight(self) -> int:
        return 0

    def set_trainer_in_iteration(self, value: bool) -> None:
        pass

    def stop_requested(self) -> bool:
        return False


def run(config: TrainerConfig, channel: TrainerChannel | None, stop_signal: Callable[[], bool],
        info: RankInfo | None = None) -> dict[str, Any]:
    """Build, warm up, then train until stopped. Returns counts for the status file.

    ``info`` (``distributed.RankInfo``; None: one process) makes this rank r of
    N: the process group is joined here, ``channel`` is rank 0's only (None on
    the others), and every decision is shared (``distributed.SharedChannel``).
    """
    info = info or RankInfo()
    if not info.distributed:
        return _train(config, channel, stop_signal, info, config.device)
    with process_group(info, config.device) as device:
        return _train(config, channel, stop_signal, info, device)


def _train(config: TrainerConfig, channel: TrainerChannel | None, stop_signal: Callable[[], bool], info: RankInfo,
           device: str) -> dict[str, Any]:
    import torch

    from autotune.gpu.tasklets import PausePoints, train_step

    policy = config.sharing_policy()
    cfg = model_config(config.model)
    seq_len = config.seq_len()
    cuda = device.startswith("cuda")
    if cuda and config.memory_fraction is not None:  # --gpu-mem-gb: the allocator's cap on this GPU
        torch.cuda.set_per_process_memory_fraction(config.memory_fraction, torch.device(device))
    dtype = getattr(torch, config.dtype or ("bfloat16" if cuda else "float32"))
    batches = training_batches(config, cfg.vocab_size, seq_len, device, info.rank, info.world_size)  # [1, S] per rank
    real = Path(config.model).is_dir() and any(Path(config.model).glob("*.safetensors"))
    if info.distributed:
        model = build_sharded_model(cfg, seq_len=seq_len, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                    device=device, dtype=dtype, seed=config.seed, info=info,
                                    full_state=hf_state_dict(cfg, Path(config.model)) if real else None)
    else:
        model = build_model(cfg, seq_len=seq_len, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                            device=device, dtype=dtype, seed=config.seed)
        if real:
            load_hf_weights(model, cfg, Path(config.model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)

    chan: TrainerChannel
    if info.distributed:  # every read is a collective: same answers, same points, on every rank
        shared = SharedChannel(channel, stop_signal, device)
        chan, should_stop = shared, shared.stop_requested
    else:
        chan = channel if channel is not None else _NoChannel()

        def should_stop() -> bool:
            return stop_signal() or chan.stop_requested()

    pause = None
    if policy.pause_points(cfg.num_layers) != (0, 0):
        pause = PausePoints(chan, policy.pause_plan, cfg.num_layers,
                            sync=torch.cuda.synchronize if cuda else (lambda: None))

    status_path = rank_path(config.status_path, info.rank)
    tokens_per_step = seq_len * info.world_size  # the global batch: one sample per rank
    log = open(config.iteration_log, "a", encoding="utf-8") if config.iteration_log and info.is_main else None
    step = logged = 0
    try:
        while not should_stop() and (config.max_steps is None or logged < config.max_steps):
            if step == config.warmup_steps:
                if info.distributed:
                    import torch.distributed as dist

                    dist.barrier()  # every rank built and warmed up
                trainable = sum(p.numel() for p in params)  # a sharded DTensor counts its full shape
                write_status(status_path, "ready", trainable_params=trainable)
                if info.is_main:
                    print(READY_LINE, flush=True)
            gate = shared.enter_iteration if info.distributed else partial(enter_iteration, chan)
            if not gate(policy, should_stop):
                break
            start_s = time.time()
            tokens, labels = next(batches)  # [1, S] each
            loss = train_step(model, optimizer, tokens, labels, pause).item()  # .item() waits for the GPU
            end_s = time.time()
            chan.set_trainer_in_iteration(False)
            step += 1
            if step <= config.warmup_steps:
                continue
            logged += 1
            if log is not None:
                log.write(iteration_record(start_s, end_s, tokens_per_step, loss) + "\n")
                log.flush()
    finally:
        chan.set_trainer_in_iteration(False)
        if log is not None:
            log.close()
    counts: dict[str, Any] = {"steps": step, "logged_steps": logged}
    if info.distributed:
        counts.update(rank=info.rank, world_size=info.world_size, shared_reads=shared.reads)
    if pause is not None:
        counts.update(pause_checks=pause.checks, pauses=pause.pauses, paused_s=pause.paused_s)
    if cuda:
        counts["peak_memory_bytes"] = torch.cuda.max_memory_allocated(torch.device(device))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.gpu.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="trainer config JSON (TrainerConfig)")
    args = parser.parse_args(argv)
    config = TrainerConfig.read(args.config)

    stop = {"requested": False}  # set by SIGTERM / SIGINT; checked between steps

    def on_signal(signum: int, frame: Any) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    info = RankInfo.from_env(os.environ)  # one process unless started as rank r of N
    status_path = rank_path(config.status_path, info.rank)
    channel = None
    if config.channel is not None and info.is_main:  # the other ranks get rank 0's reads
        channel = Channel.attach(config.channel)
    write_status(status_path, "starting", pid=os.getpid())
    try:
        counts = run(config, channel, lambda: stop["requested"], info)
    except UserError as e:
        write_status(status_path, "error", message=str(e))
        print(f"autotune-trainer: error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except Exception as e:  # OOM is told apart so the trial is recorded as infeasible
        import torch

        if not isinstance(e, torch.cuda.OutOfMemoryError):
            write_status(status_path, "error", message=f"{type(e).__name__}: {e}".splitlines()[0])
            raise
        message = "trainer out of memory: " + str(e).splitlines()[0]
        write_status(status_path, "oom", message=message)
        print(f"autotune-trainer: {message}", file=sys.stderr, flush=True)
        return EXIT_OOM
    finally:
        if channel is not None:
            channel.close()
    write_status(status_path, "stopped", **counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
