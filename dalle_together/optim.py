"""Optimizers and the learning-rate schedule, built from one :class:`OptimConfig`.

Gradient clipping happens *inside* ``step()``: when hivemind offloads the optimizer to the CPU
it steps on its own copies of the parameters, and the gradients it averaged live there, so
clipping the model's ``.grad`` in the training loop would clip the wrong tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from dalle_together.config import OptimConfig
from dalle_together.errors import UserError

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    if max_norm <= 0:
        return
    grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm of its own parameters before each step."""

    def __init__(self, params: Params, *, max_grad_norm: float, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        _clip(self, self.max_grad_norm)
        return super().step(closure)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam moments with a per-tensor trust ratio ``|w| / |update|``.

    Layer-wise adaptation is what lets the collaboration use a global batch of thousands
    without diverging. Clips the global gradient norm before each step, like ClippedAdamW.
    """

    def __init__(
        self,
        params: Params,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        clamp_value: float = 10.0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp_value=clamp_value)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _clip(self, self.max_grad_norm)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** state["step"])
                v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm = p.norm().clamp(max=group["clamp_value"])
                update_norm = update.norm()
                trust_ratio = (
                    (weight_norm / update_norm).item() if weight_norm > 0 and update_norm > 0 else 1.0
                )
                p.add_(update, alpha=-group["lr"] * trust_ratio)
        return loss


def build_optimizer(params: Params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names; ``params`` may be parameter groups (e.g. decay / no decay)."""
    common = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.eight_bit_states:
        return _build_8bit(params, cfg, common)
    if cfg.optimizer == "adamw":
        return ClippedAdamW(params, max_grad_norm=cfg.grad_clip, **common)
    if cfg.optimizer == "lamb":
        return Lamb(params, max_grad_norm=cfg.grad_clip, **common)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or lamb")


def _build_8bit(params: Params, cfg: OptimConfig, common: dict[str, Any]) -> torch.optim.Optimizer:
    """8-bit optimizer moments (bitsandbytes) for models whose fp32 Adam states don't fit."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError("8-bit optimizer states need bitsandbytes: pip install bitsandbytes") from e
    base = {"adamw": bnb.optim.AdamW8bit, "lamb": bnb.optim.LAMB8bit}[cfg.optimizer]

    class Clipped8bit(base):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            _clip(self, cfg.grad_clip)
            return super().step(closure)

    return Clipped8bit(params, **common)


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int | None = None) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``, then flat.

    ``step`` is the global optimizer step (a collaboration's epoch), so every peer agrees on it.
    """
    total = max(total_steps or cfg.total_steps, 1)
    warmup = min(cfg.warmup_steps, total - 1) if total > 1 else 0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return cosine_multiplier(schedule_progress(step, cfg, total), cfg)


def schedule_progress(step: int, cfg: OptimConfig, total_steps: int | None = None) -> float:
    """How far along its cosine the schedule is at ``step``: 0 until warm-up ends, 1 at ``total_steps``."""
    total = max(total_steps or cfg.total_steps, 1)
    warmup = min(cfg.warmup_steps, total - 1) if total > 1 else 0
    return min(1.0, max(step - warmup, 0) / max(total - warmup, 1))


def cosine_multiplier(progress: float, cfg: OptimConfig) -> float:
    """The cosine decay from 1 (``progress`` 0) to ``min_lr_ratio`` (``progress`` 1)."""
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
