"""hivemind.Optimizer configured from a :class:`RunConfig`, the way the seed's dalle-hivemind run was.

The training loop treats the result as an ordinary torch optimizer (``loss.backward();
optimizer.step(); optimizer.zero_grad()``): it accumulates local gradients until the whole
swarm has processed ``cfg.optim.target_batch_size`` samples (one *epoch*), then averages
gradients with the peers (compressed), runs the wrapped optimizer (AdamW or LAMB with clipping
inside its ``step``) and steps the learning-rate schedule once: the schedule follows the global
epoch, so every peer agrees on it. ``optimizer.local_epoch`` is that global step.

Constraints of hivemind 1.1.12, checked here so they fail at start-up with a sentence:
``delay_grad_averaging`` needs ``delay_optimizer_step``, which needs ``offload_optimizer``
(hivemind only asserts the latter at the first epoch); a client-mode peer cannot be auxiliary.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import hivemind
import torch
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.optim.grad_averager import GradientAverager

from dalle_together.config import OptimConfig, RunConfig
from dalle_together.errors import UserError
from dalle_together.optim import build_optimizer, lr_multiplier
from dalle_together.swarm.dht import signing_key

Compression = Literal["none", "fp16", "8bit"]

AVERAGE_STATE_EVERY = 5
"""Average parameters and optimizer state with peers every this many epochs.

Gradient averaging alone keeps peers identical only while every peer joins every round without
lossy compression; state averaging pulls back peers that missed a round or drifted through
8-bit/fp16 rounding. Every 5 epochs costs 1/5 of the bandwidth of doing it every epoch."""


def averaging_compression(kind: Compression, threshold: int) -> CompressionBase:
    """How tensors are compressed when averaged: ``8bit`` quantizes big tensors, fp16 small ones."""
    if kind == "none":
        return NoCompression()
    if kind == "fp16":
        return Float16Compression()
    if kind == "8bit":
        return SizeAdaptiveCompression(
            threshold=threshold, less=Float16Compression(), greater_equal=Uniform8BitQuantization()
        )
    raise UserError(f"unknown compression {kind!r}; choose none, fp16 or 8bit")


def state_download_compression(kind: Compression) -> CompressionBase:
    """Compression of the state a joiner downloads: never 8-bit (it would start with damaged weights
    and optimizer moments), fp16 if averaging is lossy anyway."""
    return NoCompression() if kind == "none" else Float16Compression()


def _make_scheduler(
    optimizer: torch.optim.Optimizer, *, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, cfg=cfg))


def default_param_groups(
    model: torch.nn.Module, cfg: OptimConfig
) -> list[dict[str, Any]] | list[torch.Tensor]:
    """The model's own parameter groups (decay / no decay) if it defines them, else its parameters."""
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg.weight_decay)
    return [p for p in model.parameters() if p.requires_grad]


def make_swarm_optimizer(
    *,
    dht: hivemind.DHT,
    run_id: str,
    model: torch.nn.Module,
    cfg: RunConfig,
    batch_size_per_step: int | None,
    client_mode: bool,
    auxiliary: bool = False,
    compression: Compression | None = None,
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor] | None = None,
    average_state_every: int = AVERAGE_STATE_EVERY,
    load_state_timeout_s: float = 600.0,
    verbose: bool = False,
) -> hivemind.Optimizer:
    """A hivemind.Optimizer over ``model``'s parameters, configured from ``cfg.optim`` and ``cfg.swarm``.

    :param batch_size_per_step: samples behind each ``step()`` call of this peer (``None`` if auxiliary).
    :param client_mode: must match the DHT's (hivemind 1.1.12 silently uses the DHT's mode anyway).
    :param auxiliary: a peer that trains nothing but may help averaging and serve/download state
      (the coordinator's checkpointer); it never runs the optimizer, so it is never offloaded.
    :param compression: averaging compression; ``None`` uses ``cfg.swarm.compression``.
    :param param_groups: default: ``model.param_groups(weight_decay)`` (or all trainable parameters).
    :note: a peer joining a running swarm must call ``load_state_from_peers()`` before training.
    """
    swarm = cfg.swarm
    if auxiliary and client_mode:
        raise UserError("an auxiliary peer must accept connections; it cannot run in client mode")
    if auxiliary != (batch_size_per_step is None):
        raise ValueError("give batch_size_per_step to a training peer, and only to a training peer")
    if batch_size_per_step is not None and batch_size_per_step <= 0:
        raise UserError(f"batch size per step must be positive, got {batch_size_per_step}")
    offload, delay_step, delay_grads = (
        swarm.offload_optimizer,
        swarm.delay_optimizer_step,
        swarm.delay_grad_averaging,
    )
    if auxiliary:
        offload = delay_step = delay_grads = False
    if delay_grads and not delay_step:
        raise UserError("delay_grad_averaging needs delay_optimizer_step (a hivemind 1.1.12 requirement)")
    if delay_step and not offload:
        raise UserError(
            "delay_optimizer_step needs offload_optimizer (the delayed step runs on offloaded copies)"
        )
    if average_state_every < 1:
        raise ValueError("average_state_every must be at least 1")
    if client_mode != dht.client_mode:
        raise ValueError(
            f"client_mode={client_mode} but the DHT was started with client_mode={dht.client_mode}"
        )

    request_timeout = min(3.0, swarm.matchmaking_time_s / 2)
    kind = compression if compression is not None else swarm.compression
    averaging = averaging_compression(kind, swarm.size_adaptive_threshold)
    params = list(param_groups) if param_groups is not None else default_param_groups(model, cfg.optim)

    return hivemind.Optimizer(
        dht=dht,
        run_id=run_id,
        target_batch_size=cfg.optim.target_batch_size,
        batch_size_per_step=batch_size_per_step,
        params=params,
        optimizer=partial(build_optimizer, cfg=cfg.optim),
        scheduler=partial(_make_scheduler, cfg=cfg.optim),
        matchmaking_time=swarm.matchmaking_time_s,
        averaging_timeout=swarm.averaging_timeout_s,
        allreduce_timeout=swarm.allreduce_timeout_s,
        load_state_timeout=load_state_timeout_s,
        offload_optimizer=offload,
        delay_optimizer_step=delay_step,
        delay_grad_averaging=delay_grads,
        average_state_every=average_state_every,
        client_mode=client_mode,
        auxiliary=auxiliary,
        grad_compression=averaging,
        state_averaging_compression=averaging,
        load_state_compression=state_download_compression(kind),
        # one key signs all of this peer's records, so peers sharing a process stay distinct
        tracker_opts=dict(private_key=signing_key(dht)),
        # hivemind warns (and may deadlock) when a request may outlive the matchmaking window;
        # 1.1.12 forwards averager_opts to the state averager only, so the gradient averager's
        # timeout goes through its factory
        averager_opts=dict(request_timeout=request_timeout),
        grad_averager_factory=partial(GradientAverager, request_timeout=request_timeout),
        verbose=verbose,
    )


def apply_pending_updates(optimizer: hivemind.Optimizer) -> None:
    """Wait for background optimizer steps and averaging rounds and copy their results into the model.

    With ``delay_optimizer_step`` the model lags one step behind the optimizer; call this before
    reading or saving the model's weights outside the training loop.
    """
    optimizer.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
