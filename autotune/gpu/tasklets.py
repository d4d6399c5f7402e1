"""One LoRA training step run as tasklets, with pause points between them.

The step of a torchtune ``TransformerDecoder`` with per-layer activation
checkpointing, cut where LLMStation's trainer yields:

forward tasklets (num_layers + 1; 33 for a 32-layer model)
    0 .. L-1  layer i's forward without grad, keeping its input (tasklet 0
              also runs the token embeddings);
    L         head: final norm + output + loss with grad, and their backward
              down to the last layer's output.
backward tasklets (num_layers; 32 for a 32-layer model)
    0 .. L-1  layer L-1-i: recompute its forward from its detached input (with
              grad) and backward the incoming gradient; the input's grad goes to
              the layer below. Layer 0's input (the frozen embeddings' output)
              needs no grad, so its backward stops there.
then the optimizer step (no pause point after it: the iteration ends).

Stock PyTorch autograd runs each piece; nothing is patched. The embeddings,
norms and base weights are frozen, so there is no embeddings backward tasklet.

Sharded over several GPUs (FSDP2, ``autotune.gpu.distributed``), the same step
runs on every rank: each layer's FSDP hooks all-gather its weights at its
forward and recomputation and reduce-scatter its LoRA gradients after its
backward; the root's own weights (embeddings, final norm, output) are
gathered around the embeddings and the head only (``_root_gathered``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from autotune.policy import BACKWARD, FORWARD, PausePlan, num_backward_tasklets, num_forward_tasklets



@dataclass(frozen=True)
class Tasklet:
    """A tasklet that has just run: its pass and its index within that pass."""

    pass_name: str  # FORWARD | BACKWARD
    index: int
    loss: torch.Tensor | None = None  # set by the head tasklet only (detached)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits [B, S, V] (float32), labels [B, S]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@contextmanager
def _root_gathered(model: nn.Module) -> Iterator[None]:
    """An FSDP2 root's own weights, gathered for the block (not recursive); a
    plain model as it is. The step never calls the root's forward, whose hooks
    would do this."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def step_tasklets(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> Iterator[Tasklet]:
    """Run one step's forward and backward one tasklet per ``next()``.

    ``model`` is a torchtune ``TransformerDecoder``; tokens and labels are
    [B, S] token ids. Gradients accumulate into the trainable parameters'
    ``.grad``; the caller runs the optimizer.
    """
    layers = list(model.layers)
    inputs: list[torch.Tensor] = []  # each layer's input, [B, S, D], no grad
    with torch.no_grad():
        with _root_gathered(model):
            h = model.tok_embeddings(tokens)  # [B, S, D]
        for i, layer in enumerate(layers):
            inputs.append(h)
            h = layer(h)  # causal self-attention (no mask, no KV cache)
            yield Tasklet(FORWARD, i)

    # Head: norm + output + loss, with grad from the last layer's output on.
    h = h.detach().requires_grad_(True)
    with _root_gathered(model):
        loss = lm_loss(model.unembed(h), labels)  # logits [B, S, V] float32
        loss.backward()
    grad = h.grad  # [B, S, D]
    yield Tasklet(FORWARD, len(layers), loss=loss.detach())

    for j, i in enumerate(reversed(range(len(layers)))):
        x = inputs.pop()  # layer i's input
        x.requires_grad_(i > 0)  # layer 0's input comes from frozen embeddings
        y = layers[i](x)  # recompute, [B, S, D]
        torch.autograd.backward(y, grad)
        grad = x.grad if i > 0 else None
        del x, y
        yield Tasklet(BACKWARD, j)


def plain_step_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: one plain forward and backward of the whole model."""
    loss = lm_loss(model(tokens), labels)
    loss.backward()
    return loss.detach()


class InFlight(Protocol):
    """What the pause logic reads of the channel."""

    def requests_in_flight(self) -> int: ...


class NoRequests:
    """The trainer alone: the checks still run, and never find a request."""

    def requests_in_flight(self) -> int:
        return 0


@dataclass
class PausePoints:
    """The sharing policy's pause plan at work (``autotune.policy.PausePlan``,
    the simulator's segments): at each of its pause points, if requests are
    in flight, sleep that pass's wait.

    ``sync`` runs at every pause point, before the check: on CUDA it is
    ``torch.cuda.synchronize``, so the check happens where the GPU really is
    (not up to a pass ahead, where the CPU's kernel launches may be) and a
    sleep really leaves the GPU to the server. It is part of what a pause
    point costs the trainer (what fig12 measures).
    """

    channel: InFlight
    plan: PausePlan
    num_layers: int
    sync: Callable[[], None] = lambda: None
    sleep: Callable[[float], None] = time.sleep
    checks: int = 0  # pause points reached
    pauses: int = 0  # of those, the ones that slept
    paused_s: float = 0.0  # total sleep asked for, s

    def after(self, tasklet: Tasklet) -> None:
        pass_tasklets = (num_forward_tasklets(self.num_layers) if tasklet.pass_name == FORWARD
                         else num_backward_tasklets(self.num_layers))
        wait_s = self.plan.wait_after_s(tasklet.pass_name, tasklet.index, pass_tasklets)
        if wait_s is None:
            return
        self.checks += 1
        self.sync()
        if self.channel.requests_in_flight() > 0 and wait_s > 0:
            self.pauses += 1
            self.paused_s += wait_s
            self.sleep(wait_s)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    pause: PausePoints | None = None,
) -> torch.Tensor:
    """One training step as tasklets, pausing where ``pause`` says. Returns the loss (detached)."""
    loss = None
    for tasklet in step_tasklets(model, tokens, labels):
        if tasklet.loss is not None:
            loss = tasklet.loss
        if pause is not None:
            pause.after(tasklet)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert loss is not None, "the head tasklet did not run"
    return loss
