"""The tasklet step: same loss and LoRA gradients as one plain backward; pause points."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtune")

from autotune.gpu.tasklets import (  # noqa: E402
    BACKWARD,
    FORWARD,
    NoRequests,
    PausePoints,
    Tasklet,
    num_backward_tasklets,
    num_forward_tasklets,
    plain_step_loss,
    step_tasklets,
    train_step,
)
from autotune.gpu.trainer import build_model  # noqa: E402
from autotune.models import PRESETS, ModelConfig  # noqa: E402
from autotune.policy import PausePlan  # noqa: E402

SEQ = 24  # tokens per tiny sample


def tiny(**overrides) -> ModelConfig:
    base = dict(
        name="tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, vocab_size=128, rope_theta=500000.0, rope_scaling=PRESETS["llama-3.1-8b"].rope_scaling,
    )
    return ModelConfig(**{**base, **overrides})


TINY = {  # one per torchtune builder the presets use
    "llama3_1": tiny(),
    "llama3_2_tied": tiny(tie_word_embeddings=True, rope_scaling=PRESETS["llama-3.2-1b"].rope_scaling),
    "llama2": tiny(num_layers=3, num_kv_heads=4, rope_theta=10000.0, rope_scaling=None),
    "qwen2_bias": tiny(qkv_bias=True, rope_theta=1e6, rope_scaling=None, rms_norm_eps=1e-6),
}


def tiny_model(cfg: ModelConfig, seed: int = 0):
    model = build_model(cfg, seq_len=SEQ, lora_rank=8, lora_alpha=16.0, device="cpu", dtype=torch.float32, seed=seed)
    # LoRA's B starts at zero, which makes A's gradient zero: give B values so every grad is tested.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def batch(cfg: ModelConfig, seed: int = 0):
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]  # tokens, labels: [1, SEQ]


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(TINY))
def test_tasklet_step_gives_plain_backward_loss_and_lora_grads(family: str) -> None:
    cfg = TINY[family]
    model = tiny_model(cfg)
    reference = copy.deepcopy(model)
    tokens, labels = batch(cfg)

    loss_ref = plain_step_loss(reference, tokens, labels)
    tasklets = list(step_tasklets(model, tokens, labels))
    (loss,) = [t.loss for t in tasklets if t.loss is not None]

    torch.testing.assert_close(loss, loss_ref)
    got, want = lora_grads(model), lora_grads(reference)
    assert set(got) == set(want) and len(got) == 6 * cfg.num_layers  # A and B of q, k, v per layer
    for name in want:
        assert want[name].abs().sum() > 0, f"{name}: zero reference gradient tests nothing"
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_tasklets_come_in_the_design_order() -> None:
    cfg = TINY["llama2"]  # 3 layers
    tasklets = list(step_tasklets(tiny_model(cfg), *batch(cfg)))
    passes = [(t.pass_name, t.index) for t in tasklets]
    assert num_forward_tasklets(3) == 4 and num_backward_tasklets(3) == 3
    assert passes == [(FORWARD, i) for i in range(4)] + [(BACKWARD, i) for i in range(3)]
    assert [t.loss is not None for t in tasklets] == [False, False, False, True, False, False, False]


def test_train_step_updates_lora_only() -> None:
    cfg = TINY["llama3_1"]
    model = tiny_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    loss = train_step(model, optimizer, *batch(cfg))
    assert 0 < loss.item() < 10
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, name
        assert p.grad is None, f"{name}: grads are cleared after the step"


class FakeChannel:
    def __init__(self, in_flight: list[int]) -> None:
        self.in_flight = list(in_flight)  # returned in turn; the last value repeats

    def requests_in_flight(self) -> int:
        return self.in_flight.pop(0) if len(self.in_flight) > 1 else self.in_flight[0]


def one_pass(layers: int) -> list[Tasklet]:
    return [Tasklet(FORWARD, i) for i in range(num_forward_tasklets(layers))] + [
        Tasklet(BACKWARD, i) for i in range(num_backward_tasklets(layers))
    ]


def pause_points(channel, num_layers: int, **knobs) -> tuple[PausePoints, list[float], list[int]]:
    slept: list[float] = []
    syncs: list[int] = []
    pause = PausePoints(channel, PausePlan(**knobs), num_layers, sleep=slept.append, sync=lambda: syncs.append(1))
    return pause, slept, syncs


def test_pause_points_every_n_tasklets_while_requests_in_flight() -> None:
    knobs = dict(forward_tasklets=8, forward_wait_s=0.005, backward_tasklets=3, backward_wait_s=0.02)
    pause, slept, syncs = pause_points(FakeChannel([1]), 32, **knobs)
    for tasklet in one_pass(32):  # 33 forward, 32 backward tasklets
        pause.after(tasklet)
    # forward: after tasklets 8, 16, 24, 32 and the pass's end (33); backward: after 3, 6, ..., 30 and 32
    assert slept == [0.005] * 5 + [0.02] * 11
    assert pause.checks == pause.pauses == 16 and len(syncs) == 16
    assert pause.paused_s == pytest.approx(5 * 0.005 + 11 * 0.02)


def test_pause_points_check_but_never_wait_without_requests() -> None:
    knobs = dict(forward_tasklets=1, forward_wait_s=0.5, backward_tasklets=2, backward_wait_s=0.5)
    for channel in (FakeChannel([0]), NoRequests()):
        pause, slept, syncs = pause_points(channel, 4, **knobs)
        for tasklet in one_pass(4):  # 5 forward, 4 backward
            pause.after(tasklet)
        assert slept == [] and pause.pauses == 0
        assert pause.checks == 5 + 2 and len(syncs) == 7  # the checks are paid all the same


def test_pause_points_wait_only_when_the_check_finds_requests() -> None:
    # in flight at the 1st and 3rd checks only
    pause, slept, _ = pause_points(FakeChannel([2, 0, 1, 0]), 7, forward_tasklets=2, forward_wait_s=0.01)
    for tasklet in one_pass(7):  # 8 forward tasklets: 4 checks; backward has no pause points
        pause.after(tasklet)
    assert slept == [0.01, 0.01] and pause.checks == 4


def test_train_step_pauses_inside_the_step() -> None:
    cfg = TINY["llama2"]  # 3 layers: 4 forward, 3 backward tasklets
    model = tiny_model(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    pause, slept, _ = pause_points(
        FakeChannel([1]), cfg.num_layers, forward_tasklets=2, forward_wait_s=0.1, backward_tasklets=1, backward_wait_s=0.2
    )
    train_step(model, optimizer, *batch(cfg), pause=pause)
    assert slept == [0.1, 0.1, 0.2, 0.2, 0.2]
