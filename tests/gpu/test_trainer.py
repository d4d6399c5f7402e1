"""The trainer process: FineInfer's iteration gate, the log, the entry point (its model: test_lora_model.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtune")

from autotune.gpu.trainer import (  # noqa: E402
    EXIT_OOM,
    READY_LINE,
    TrainerConfig,
    enter_iteration,
    iteration_record,
    read_iteration_log,
    run,
    trainer_command,
)
from autotune.metrics import TrainerIteration, peft_metrics  # noqa: E402
from autotune.models import PRESETS  # noqa: E402
from autotune.policy import ArrivalGate, PausePlan, SharingPolicy  # noqa: E402

from tiny_model import TINY  # noqa: E402

LLMSTATION = SharingPolicy(
    mps=True, gpu_memory_utilization=0.75, trainer_seq_len_tokens=16,
    pause_plan=PausePlan(forward_tasklets=1, forward_wait_s=0.001, backward_tasklets=1, backward_wait_s=0.001),
)


def gated(poll_s: float) -> SharingPolicy:
    """FineInfer's policy, its gate polling every ``poll_s``."""
    return SharingPolicy(mps=False, gpu_memory_utilization=0.75, arrival_gate=ArrivalGate(0.01, poll_s))


class FakeChannel:
    def __init__(self, in_flight: list[int], stop_after_checks: int | None = None) -> None:
        self.in_flight = list(in_flight)  # returned in turn; the last value repeats
        self.flags: list[bool] = []  # every set_trainer_in_iteration
        self.stop_checks = 0
        self.stop_after_checks = stop_after_checks

    def requests_in_flight(self) -> int:
        return self.in_flight.pop(0) if len(self.in_flight) > 1 else self.in_flight[0]

    def set_trainer_in_iteration(self, value: bool) -> None:
        self.flags.append(value)

    def stop_requested(self) -> bool:
        self.stop_checks += 1
        return self.stop_after_checks is not None and self.stop_checks > self.stop_after_checks


def test_iteration_gate_waits_while_requests_are_in_flight() -> None:
    channel = FakeChannel([3, 1, 0])
    slept: list[float] = []
    assert enter_iteration(channel, gated(0.005), lambda: False, sleep=slept.append)
    assert slept == [0.005, 0.005]
    # raised before each look at the count, lowered when it found requests
    assert channel.flags == [True, False, True, False, True]


def test_iteration_gate_gives_up_when_asked_to_stop() -> None:
    channel = FakeChannel([1])
    slept: list[float] = []
    stops = iter([False, False, True])
    assert not enter_iteration(channel, gated(0.01), lambda: next(stops), sleep=slept.append)
    assert slept == [0.01, 0.01] and channel.flags[-1] is False


def test_iteration_log_reads_back_and_skips_a_cut_line(tmp_path: Path) -> None:
    log = tmp_path / "iterations.jsonl"
    lines = [iteration_record(10.0, 10.5, 512, 11.7), iteration_record(10.5, 11.5, 512, 11.6)]
    log.write_text("\n".join(lines) + '\n{"start_s": 11.5, "end_')
    its = read_iteration_log(log)
    assert its == [TrainerIteration(10.0, 10.5, 512), TrainerIteration(10.5, 11.5, 512)]
    assert peft_metrics(its, 10.0, 11.5).peft_samples_per_s == pytest.approx(2 / 1.5)


def test_config_round_trips(tmp_path: Path) -> None:
    config = TrainerConfig(model="llama-3.1-8b", policy=LLMSTATION.to_dict(), channel="abc", seed=7)
    config.write(tmp_path / "c.json")
    back = TrainerConfig.read(tmp_path / "c.json")
    assert back == config and back.sharing_policy() == LLMSTATION and back.seq_len() == 16
    assert trainer_command("c.json")[1:] == ["-m", "autotune.gpu.trainer", "--config", "c.json"]


def tiny_folder(tmp_path: Path) -> str:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY.hf_config()))
    return str(folder)


def test_run_logs_measured_steps_and_pays_pause_checks_alone(tmp_path: Path, capsys) -> None:
    log = tmp_path / "it.jsonl"
    config = TrainerConfig(model=tiny_folder(tmp_path), policy=LLMSTATION.to_dict(), iteration_log=str(log),
                           status_path=str(tmp_path / "status.json"), device="cpu", warmup_steps=1, max_steps=2)
    counts = run(config, None, lambda: False)  # the trainer alone (fig12): checks, never waits
    its = read_iteration_log(log)
    assert len(its) == 2 and all(it.tokens == 16 and it.end_s > it.start_s for it in its)
    assert its[0].end_s <= its[1].start_s
    assert counts["steps"] == 3 and counts["pause_checks"] == 3 * (3 + 2) and counts["pauses"] == 0
    assert capsys.readouterr().out.strip() == READY_LINE
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "ready" and status["trainable_params"] == TINY.lora_params(8)


def test_run_marks_iterations_and_stops_on_the_channel(tmp_path: Path) -> None:
    fineinfer = SharingPolicy(mps=False, gpu_memory_utilization=0.75, trainer_seq_len_tokens=8,
                              arrival_gate=ArrivalGate(defer_s=0.01, poll_s=0.0))
    channel = FakeChannel([0], stop_after_checks=4)
    config = TrainerConfig(model=tiny_folder(tmp_path), policy=fineinfer.to_dict(), device="cpu", warmup_steps=0)
    counts = run(config, channel, lambda: False)
    assert counts["steps"] >= 1 and counts["logged_steps"] == counts["steps"]
    # each step: flag up (then no requests found), flag down; and down once more at exit
    assert channel.flags == [True, False] * counts["steps"] + [False]


def test_entry_point_trains_until_the_channel_asks_it_to_stop(tmp_path: Path) -> None:
    from autotune.gpu.channel import Channel

    log, status = tmp_path / "it.jsonl", tmp_path / "status.json"
    with Channel.create() as channel:
        config = TrainerConfig(model=tiny_folder(tmp_path), policy=LLMSTATION.to_dict(), iteration_log=str(log),
                               status_path=str(status), channel=channel.name, device="cpu", warmup_steps=1)
        config.write(tmp_path / "config.json")
        proc = subprocess.Popen(trainer_command(tmp_path / "config.json"), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == READY_LINE
            deadline = time.monotonic() + 60
            while len(read_iteration_log(log)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            channel.request_stop()
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()
        assert not channel.trainer_in_iteration()
    assert len(read_iteration_log(log)) >= 2
    done = json.loads(status.read_text())
    assert done["state"] == "stopped" and done["logged_steps"] == len(read_iteration_log(log))


def test_entry_point_reports_a_bad_model_name(tmp_path: Path) -> None:
    config = TrainerConfig(model="no-such-model", policy=LLMSTATION.to_dict(), status_path=str(tmp_path / "s.json"),
                           device="cpu")
    config.write(tmp_path / "config.json")
    proc = subprocess.run(trainer_command(tmp_path / "config.json"), capture_output=True, text=True, timeout=120)
    assert proc.returncode not in (0, EXIT_OOM)
    status = json.loads((tmp_path / "s.json").read_text())
    assert status["state"] == "error" and "no-such-model" in status["message"]


@pytest.mark.gpu
def test_cuda_steps_in_bf16_and_syncs_at_pause_points(tmp_path: Path) -> None:
    log = tmp_path / "it.jsonl"
    config = TrainerConfig(model=tiny_folder(tmp_path), policy=LLMSTATION.to_dict(), iteration_log=str(log),
                           device="cuda", warmup_steps=1, max_steps=3)
    counts = run(config, FakeChannel([1]), lambda: False)
    assert counts["pauses"] == counts["pause_checks"] == 4 * 5 and counts["peak_memory_bytes"] > 0
    assert len(read_iteration_log(log)) == 3


def test_out_of_memory_exits_with_its_own_code(tmp_path: Path, monkeypatch) -> None:
    import autotune.gpu.trainer as trainer

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "run", oom)
    monkeypatch.setattr(trainer.signal, "signal", lambda *args: None)  # keep pytest's handlers
    config = TrainerConfig(model="llama-3.1-8b", policy=LLMSTATION.to_dict(), status_path=str(tmp_path / "s.json"))
    config.write(tmp_path / "config.json")
    assert trainer.main(["--config", str(tmp_path / "config.json")]) == EXIT_OOM
    status = json.loads((tmp_path / "s.json").read_text())
    assert status["state"] == "oom" and status["message"].startswith("trainer out of memory: CUDA out of memory")
