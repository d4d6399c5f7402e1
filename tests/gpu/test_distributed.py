"""``--gpus N`` on the CPU: the FSDP2 trainer ranks over gloo, their shared
decisions, the launcher, ``--gpu-mem-gb`` and the CLI.

The multi-process tests start real processes (2 ranks, gloo) and bound every
wait, so a deadlock fails the test instead of hanging it. This file is also
the rank script of the FSDP step test (``python test_distributed.py fsdp-step``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtune")

from autotune.errors import UserError  # noqa: E402
from autotune.errors import TrialCrash  # noqa: E402
from autotune.gpu.backend import GpuBackend, _trainer_failure, hardware_profile, visible_gpus  # noqa: E402
from autotune.memory import plan_for_trial  # noqa: E402
from autotune.gpu.distributed import RankInfo, TrainerRanks, rank_env, rank_path  # noqa: E402
from autotune.gpu.procs import ProcessRegistry, is_alive  # noqa: E402
from autotune.gpu.trainer import EXIT_OOM, TrainerConfig, build_model, read_iteration_log, trainer_command  # noqa: E402
from autotune.models import PRESETS  # noqa: E402
from autotune.policy import ArrivalGate, PausePlan, SharingPolicy  # noqa: E402

from tiny_model import TINY  # noqa: E402

SEQ = 16  # tokens per sample
WAIT_S = 120.0  # bound on every multi-process wait: a deadlock fails, it does not hang
LLMSTATION = SharingPolicy(
    mps=True, gpu_memory_utilization=0.75, trainer_seq_len_tokens=SEQ,
    pause_plan=PausePlan(forward_tasklets=1, forward_wait_s=0.001, backward_tasklets=1, backward_wait_s=0.001),
)
FINEINFER = SharingPolicy(mps=False, gpu_memory_utilization=0.75, trainer_seq_len_tokens=SEQ,
                          arrival_gate=ArrivalGate(defer_s=0.01, poll_s=0.01))


# ---------------------------------------------------------------- FSDP2 step = one process on the global batch


def tiny_model():
    """The tiny model with LoRA B non-zero (else A's gradient is zero and tests nothing)."""
    model = build_model(TINY, seq_len=SEQ, lora_rank=8, lora_alpha=16.0, device="cpu", dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def global_batch(world_size: int):
    ids = torch.randint(0, TINY.vocab_size, (world_size, SEQ + 1), generator=torch.Generator().manual_seed(5))
    return ids[:, :-1], ids[:, 1:]  # [N, S] each: row r is rank r's sample


def _fsdp_step_rank(out: Path) -> None:
    """One rank: the tasklet step of the sharded model on its row, then AdamW."""
    import torch.distributed as dist

    from autotune.gpu.distributed import build_sharded_model, process_group
    from autotune.gpu.tasklets import step_tasklets

    info = RankInfo.from_env(os.environ)
    with process_group(info, "cpu") as device:
        full = tiny_model().state_dict()
        model = build_sharded_model(TINY, seq_len=SEQ, lora_rank=8, lora_alpha=16.0, device=device,
                                    dtype=torch.float32, seed=0, info=info, full_state=full)
        tokens, labels = global_batch(info.world_size)
        r = info.rank
        (loss,) = [t.loss for t in step_tasklets(model, tokens[r:r + 1], labels[r:r + 1]) if t.loss is not None]
        losses = [torch.zeros(()) for _ in range(info.world_size)]
        dist.all_gather(losses, loss)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = {n: p.grad.full_tensor() for n, p in trainable}
        optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
        optimizer.step()
        params = {n: p.full_tensor() for n, p in model.named_parameters()}  # every weight, base included
        local = {n: p.to_local().numel() for n, p in trainable}
        torch.save({"losses": torch.stack(losses), "grads": grads, "params": params, "local": local},
                   out / f"rank{r}.pt")


def _run_ranks(argv: list[str], tmp_path: Path, world_size: int = 2) -> list[int | None]:
    with ProcessRegistry() as procs:
        ranks = TrainerRanks(procs, argv, tmp_path, dict(os.environ), world_size, grace_s=5.0)
        ranks.start()
        codes = ranks.wait(WAIT_S)
        ranks.kill()
    return codes


def test_fsdp_tasklet_step_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    codes = _run_ranks([sys.executable, __file__, "fsdp-step", str(tmp_path)], tmp_path)
    assert codes == [0, 0], (tmp_path / "trainer-rank0.log").read_text()[-3000:]

    reference = tiny_model()  # one process, both samples as a batch of 2
    tokens, labels = global_batch(2)
    from autotune.gpu.tasklets import step_tasklets

    (loss,) = [t.loss for t in step_tasklets(reference, tokens, labels) if t.loss is not None]
    trainable = [p for p in reference.parameters() if p.requires_grad]
    want_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    torch.optim.AdamW(trainable, lr=1e-2).step()

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["losses"], r1["losses"])
    assert r0["losses"][0] != r0["losses"][1]  # two different samples
    torch.testing.assert_close(r0["losses"].mean(), loss)  # the global batch's mean loss
    assert set(r0["grads"]) == set(want_grads) and len(want_grads) == 6 * TINY.num_layers
    for name, want in want_grads.items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(r0["grads"][name], want, msg=lambda m, n=name: f"{n}: {m}")
    for name, p in reference.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(r1["params"][name], r0["params"][name])
    # really sharded: each rank holds half of every LoRA weight
    full = {n: p.numel() for n, p in reference.named_parameters() if p.requires_grad}
    assert all(r0["local"][n] * 2 == full[n] == r1["local"][n] * 2 for n in full)


# ---------------------------------------------------------------- the trainer's ranks, end to end


def tiny_folder(tmp_path: Path) -> str:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY.hf_config()))
    return str(folder)


def _wait_for(cond, ranks: TrainerRanks, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert ranks.first_exit() is None, f"a rank ended while waiting for {what}: {ranks.first_exit()}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S:g} s"
        time.sleep(0.05)


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _start_two_ranks(tmp_path: Path, procs: ProcessRegistry, channel, policy, warmup_steps: int) -> TrainerRanks:
    """Two CPU ranks of the tiny model under ``policy``, rank 0 on ``channel``;
    iteration log ``it.jsonl`` and status ``status.json`` in ``tmp_path``."""
    config = TrainerConfig(model=tiny_folder(tmp_path), policy=policy.to_dict(), iteration_log=str(tmp_path / "it.jsonl"),
                           status_path=str(tmp_path / "status.json"), channel=channel.name, device="cpu",
                           warmup_steps=warmup_steps)
    config.write(tmp_path / "config.json")
    ranks = TrainerRanks(procs, trainer_command(tmp_path / "config.json"), tmp_path, dict(os.environ), 2, grace_s=5.0)
    ranks.start()
    return ranks


def test_ranks_pause_alike_when_only_rank_0_sees_requests(tmp_path: Path) -> None:
    from autotune.gpu.channel import Channel

    log, status = tmp_path / "it.jsonl", tmp_path / "status.json"
    with Channel.create() as channel, ProcessRegistry() as procs:
        channel.add_in_flight(1)  # a request in flight for the whole run: only rank 0 reads the channel
        ranks = _start_two_ranks(tmp_path, procs, channel, LLMSTATION, warmup_steps=1)
        try:
            _wait_for(lambda: len(read_iteration_log(log)) >= 2 if log.exists() else False, ranks, "2 steps")
            assert _status(status)["state"] == "ready" and _status(status)["trainable_params"] == TINY.lora_params(8)
            channel.request_stop()
            assert ranks.wait(WAIT_S) == [0, 0]
        finally:
            ranks.kill()
        assert not channel.trainer_in_iteration()
    done = [_status(Path(rank_path(status, r))) for r in (0, 1)]
    assert [d["state"] for d in done] == ["stopped", "stopped"]
    steps = done[0]["steps"]
    per_step = (TINY.num_layers + 1) + TINY.num_layers  # a pause point after every tasklet
    for d in done:  # rank 1 has no channel, yet paused at the very same points
        assert d["steps"] == steps and d["pause_checks"] == d["pauses"] == steps * per_step
        assert d["shared_reads"] == done[0]["shared_reads"]
    its = read_iteration_log(log)  # rank 0 alone writes it, counting both ranks' tokens
    assert len(its) == done[0]["logged_steps"] and all(it.tokens == 2 * SEQ for it in its)
    assert sorted(p.name for p in tmp_path.glob("it*.jsonl")) == ["it.jsonl"]
    assert (tmp_path / "trainer-rank1.log").exists() and not (tmp_path / "trainer.log").exists()


def test_ranks_start_no_iteration_while_rank_0_sees_requests(tmp_path: Path) -> None:
    from autotune.gpu.channel import Channel

    log, status = tmp_path / "it.jsonl", tmp_path / "status.json"
    with Channel.create() as channel, ProcessRegistry() as procs:
        channel.add_in_flight(1)
        ranks = _start_two_ranks(tmp_path, procs, channel, FINEINFER, warmup_steps=0)
        try:
            _wait_for(lambda: _status(status).get("state") == "ready", ranks, "ready")
            time.sleep(1.0)  # both ranks poll the gate: no step may start
            assert read_iteration_log(log) == []
            # The gate raises the flag for an instant before each check (the
            # handshake of enter_iteration), so look more than once: it is not held.
            assert not all(channel.trainer_in_iteration() or time.sleep(0.02) for _ in range(10))
            channel.add_in_flight(-1)
            _wait_for(lambda: len(read_iteration_log(log)) >= 2, ranks, "2 steps after the request ended")
            channel.request_stop()
            assert ranks.wait(WAIT_S) == [0, 0]
        finally:
            ranks.kill()
    done = [_status(Path(rank_path(status, r))) for r in (0, 1)]
    assert done[0]["steps"] == done[1]["steps"] == done[0]["logged_steps"] >= 2
    assert done[0]["shared_reads"] == done[1]["shared_reads"] > 2 * done[0]["steps"]  # the gate polled


# ---------------------------------------------------------------- the launcher

_ENV_DUMP = textwrap.dedent("""
    import json, os, signal, sys, time
    keys = ["MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "AUTOTUNE_TEST"]
    rank = os.environ.get("RANK", "solo")
    json.dump({k: os.environ.get(k) for k in keys}, open(os.path.join(sys.argv[1], f"env-{rank}.json"), "w"))
    mode = sys.argv[2]
    if mode == "ignore-term" and rank == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "fail":
        time.sleep(0.2 if rank == "0" else 0.8)
        sys.exit(1 if rank == "0" else 3)  # rank 1 runs out of memory, later
    time.sleep(600)
""")


def _start_dumpers(tmp_path: Path, procs: ProcessRegistry, world_size: int, mode: str) -> TrainerRanks:
    argv = [sys.executable, "-c", _ENV_DUMP, str(tmp_path), mode]
    ranks = TrainerRanks(procs, argv, tmp_path, {**os.environ, "AUTOTUNE_TEST": "kept"}, world_size, grace_s=0.5)
    ranks.start()
    names = [f"env-{r}.json" for r in range(world_size)] if world_size > 1 else ["env-solo.json"]
    deadline = time.monotonic() + 30
    while not all((tmp_path / n).exists() and (tmp_path / n).read_text() for n in names):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return ranks


def test_launcher_gives_each_rank_its_env_and_stopping_ends_all(tmp_path: Path) -> None:
    with ProcessRegistry() as procs:
        ranks = _start_dumpers(tmp_path, procs, 2, "ignore-term")
        envs = [json.loads((tmp_path / f"env-{r}.json").read_text()) for r in (0, 1)]
        port = ranks.master_port
        assert isinstance(port, int) and port > 0
        for r, env in enumerate(envs):
            assert env == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                           "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "AUTOTUNE_TEST": "kept"}
        assert [p.name for p in sorted(tmp_path.glob("trainer-rank*.log"))] == ["trainer-rank0.log",
                                                                               "trainer-rank1.log"]
        pids = [p.pid for p in ranks.ranks]
        assert len({os.getpgid(pid) for pid in pids}) == 2  # each rank its own process group
        ranks.terminate()  # rank 1 ignores SIGTERM: killed after the grace period
        assert not any(is_alive(pid) for pid in pids)
        assert [p.returncode for p in ranks.ranks] == [-15, -9]
        assert procs.running == []


def test_one_rank_gets_no_distributed_env(tmp_path: Path) -> None:
    with ProcessRegistry() as procs:
        ranks = _start_dumpers(tmp_path, procs, 1, "plain")
        env = json.loads((tmp_path / "env-solo.json").read_text())
        assert env["RANK"] is None and env["WORLD_SIZE"] is None and env["AUTOTUNE_TEST"] == "kept"
        assert ranks.master_port is None and (tmp_path / "trainer.log").exists()
        ranks.kill()
        assert not is_alive(ranks.ranks[0].pid)


def test_a_rank_that_runs_out_of_memory_is_blamed(tmp_path: Path) -> None:
    with ProcessRegistry() as procs:
        ranks = _start_dumpers(tmp_path, procs, 2, "fail")
        assert ranks.wait(30) == [1, EXIT_OOM]
        assert ranks.first_exit() == (1, EXIT_OOM)  # rank 0 failed first, but only because rank 1 ran out
    (tmp_path / "trainer-status-rank1.json").write_text(json.dumps({"state": "oom", "message": "trainer out of memory: 2 GiB"}))
    assert _trainer_failure(EXIT_OOM, tmp_path, 1, 2) == "rank 1: trainer out of memory: 2 GiB"
    (tmp_path / "trainer-status-rank1.json").write_text(json.dumps({"state": "error", "message": "ValueError: x"}))
    reason = _trainer_failure(1, tmp_path, 1, 2)
    assert reason.startswith("trainer rank 1 exited with code 1: ValueError: x") and "trainer-rank1.log" in reason


def test_rank_info_and_paths() -> None:
    assert RankInfo.from_env({}) == RankInfo(0, 1, 0) and not RankInfo().distributed
    info = RankInfo.from_env(rank_env({}, 1, 2, 29500))
    assert info == RankInfo(1, 2, 1) and info.distributed and not info.is_main
    assert rank_path("/x/trainer-status.json", 0) == "/x/trainer-status.json"
    assert rank_path("/x/trainer-status.json", 3) == "/x/trainer-status-rank3.json"
    assert rank_path(None, 1) is None


# ---------------------------------------------------------------- --gpu-mem-gb, hardware, CLI

H200_MIB = 143771  # 140.4 GiB
LLAMA8B = PRESETS["llama-3.1-8b"]


def _gpu_backend(gpus: int, gpu_mem_gb: float | None) -> GpuBackend:
    """The backend's memory planning without a GPU: only what ``_memory`` reads."""
    backend = object.__new__(GpuBackend)
    backend.gpus, backend.gpu_mem_gb, backend._gpu_mem_mib = gpus, gpu_mem_gb, H200_MIB
    return backend


def _spec(system: str):
    from autotune.systems import get_system
    from autotune.trial import TrialKind, TrialSpec
    from autotune.workloads.spec import RequestSpec, Workload

    sys_ = get_system(system)
    workload = Workload((RequestSpec(0.0, 200, 200),), 1.0, 0, True, "one request")
    return TrialSpec(TrialKind.COLOCATED, system, sys_.default_params(), sys_.policy(sys_.default_params()),
                     LLAMA8B, workload, 0)


def test_gpu_mem_gb_budgets_come_from_the_shared_memory_plan() -> None:
    total = H200_MIB / 1024
    for system in ("vllm-torchtune", "llmstation"):
        spec = _spec(system)
        plan = _gpu_backend(2, 24.0)._memory(spec)
        assert plan == plan_for_trial(spec, gpus=2, gpu_memory_gib=total, budget_gib=24.0)  # the simulator's too
        assert plan.server_gib + plan.trainer_cap_gib == pytest.approx(24.0)
        assert plan.trainer_memory_fraction == pytest.approx(plan.trainer_cap_gib / total)
    # vllm-torchtune keeps the artifact's 0.45 of 24 GiB; llmstation's 0.75 is lowered for the trainer's copy
    assert _gpu_backend(2, 24.0)._memory(_spec("vllm-torchtune")).server_gib == pytest.approx(0.45 * 24.0)
    lowered = _gpu_backend(2, 24.0)._memory(_spec("llmstation"))
    assert lowered.server_gib < 0.75 * 24.0 and "lowered from 0.75" in lowered.notes[0]
    # no --gpu-mem-gb: the system's fraction of the whole GPU, trainer uncapped
    whole = _gpu_backend(1, None)._memory(_spec("llmstation"))
    assert whole.server_gpu_memory_utilization == pytest.approx(0.75) and whole.trainer_memory_fraction is None


def test_a_budget_too_small_for_server_and_trainer_is_an_out_of_memory_crash() -> None:
    with pytest.raises(TrialCrash, match="^out of memory") as e:
        _gpu_backend(1, 16.0)._memory(_spec("vllm-torchtune"))  # 16 GiB of weights alone on one GPU
    assert "\n" not in str(e.value)


def test_hardware_names_gpus_and_memory_budget() -> None:
    assert hardware_profile("NVIDIA H200", H200_MIB) == "h200"  # a packaged profile's name: its figure rates
    assert hardware_profile("NVIDIA H100 80GB HBM3", 81559) == "h100-80gb"
    assert hardware_profile("NVIDIA GeForce RTX 4090", 24564) == "rtx-4090-24gb"
    assert hardware_profile("NVIDIA H200", H200_MIB, gpus=2) == "h200-140gb-x2"
    assert hardware_profile("NVIDIA H200", H200_MIB, gpus=2, gpu_mem_gb=24.0) == "h200-24gb-x2"
    assert visible_gpus(8, {}) == 8 and visible_gpus(8, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert visible_gpus(8, {"CUDA_VISIBLE_DEVICES": ""}) == 0


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-step"]:
    _fsdp_step_rank(Path(sys.argv[2]))
