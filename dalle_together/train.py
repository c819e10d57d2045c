"""The training loop, used alone (``dalle-together train``) and by a volunteer in a swarm.

One local step is always the same: draw a batch from the data stream, turn it into tokens, run
the model's loss, ``backward()``, ``optimizer.step()``. On one machine ``optimizer`` is a torch
optimizer and this module also steps the schedule and writes checkpoints; in a collaboration it
is a ``hivemind.Optimizer``, which averages with the other peers and owns the schedule (it steps
per global epoch), and the swarm layer decides what to publish. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalle_together.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    load_json,
    load_model_weights,
    read_latest,
    save_checkpoint,
    write_json_atomic,
)
from dalle_together.config import RunConfig
from dalle_together.data import ShapesStream, all_attributes
from dalle_together.errors import UserError
from dalle_together.model import DalleTransformer
from dalle_together.optim import build_optimizer, lr_multiplier
from dalle_together.tokenizers.text import TextTokenizer
from dalle_together.tokenizers.vqvae import VQVAE, images_to_tensor, load_vqvae, save_vqvae, train_vqvae

log = logging.getLogger(__name__)


# --- tokenizers -------------------------------------------------------------------------------


def prepare_tokenizers(
    cfg: RunConfig,
    run_dir: Path,
    *,
    vq_minutes: float | None = None,
    device: str = "cpu",
    on_vq_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[TextTokenizer, VQVAE]:
    """Load the run's tokenizers from ``run_dir``, training (and saving) any that are missing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "text_tokenizer.json").exists():
        text_tokenizer = TextTokenizer.load(run_dir)
    else:
        captions = [a.caption for a in all_attributes("all")]
        text_tokenizer = TextTokenizer.train(captions, cfg.text)
        text_tokenizer.save(run_dir)
    if (run_dir / "vqvae.json").exists():
        vqvae = load_vqvae(run_dir)
        if vqvae.cfg != cfg.vq:
            raise UserError(
                f"the image tokenizer in {run_dir} was trained with another configuration than "
                f"preset {cfg.preset!r}; use a new --out directory"
            )
    else:
        log.info("training the image tokenizer (VQ-VAE)")
        vqvae, _ = train_vqvae(
            cfg.vq, seed=cfg.data.seed, minutes=vq_minutes, device=device, on_step=on_vq_step
        )
        save_vqvae(vqvae, run_dir)
    return text_tokenizer, vqvae.to(device).eval()


# --- data -------------------------------------------------------------------------------------


def token_batches(
    cfg: RunConfig,
    text_tokenizer: TextTokenizer,
    vqvae: VQVAE,
    *,
    batch_size: int,
    worker: int = 0,
    device: str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of ``(text (B, text_len), image codes (B, grid**2))`` on ``device``.

    ``worker`` picks a disjoint data stream, so volunteers never train on the same samples.
    """
    stream = ShapesStream(image_size=cfg.data.image_size, seed=cfg.data.seed, worker=worker, split="train")
    text_cache: dict[str, list[int]] = {}  # only a few hundred distinct captions exist
    while True:
        images, captions = stream.next_batch(batch_size)
        for c in captions:
            if c not in text_cache:
                text_cache[c] = text_tokenizer.encode(c)
        text = torch.tensor([text_cache[c] for c in captions], dtype=torch.long, device=device)
        with torch.no_grad():
            codes = vqvae.encode(images_to_tensor(images).to(device))  # (B, g, g)
        yield text, codes.flatten(1)


# --- one step ---------------------------------------------------------------------------------


def autocast_context(device: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; full precision on the CPU, where bf16 matmuls are not faster."""
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def local_step(
    model: DalleTransformer,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    device: str,
) -> dict[str, float]:
    """Forward, backward and ``optimizer.step()`` on one local batch; returns the loss metrics and
    ``optimizer_s``, the seconds ``optimizer.step()`` took (for a volunteer: time not computing)."""
    text, image = batch
    with autocast_context(device):
        loss, metrics = model.loss(text, image)
    loss.backward()
    stepping = time.perf_counter()
    optimizer.step()
    metrics["optimizer_s"] = time.perf_counter() - stepping
    optimizer.zero_grad(set_to_none=True)
    return metrics


# --- training on one machine ------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint remembers about the run's progress (saved as ``state.json``)."""

    step: int = 0
    samples_seen: int = 0
    elapsed_s: float = 0.0
    schedule_total_steps: int = 0
    """Horizon of the cosine schedule; estimated from the measured speed when training by time."""
    schedule_segments: list[dict[str, int | float]] = field(default_factory=list)
    """A collaboration's schedule as its coordinator fitted it to a time budget
    (a list of ``dalle_together.swarm.schedule.Segment``; empty: ``optim``'s warm-up and cosine)."""
    loss: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    samples_per_second: float


def build_model(cfg: RunConfig, device: str = "cpu") -> DalleTransformer:
    torch.manual_seed(cfg.data.seed)
    return DalleTransformer(cfg.model).to(device)


def load_train_state(run_dir: Path, model: DalleTransformer, optimizer: torch.optim.Optimizer) -> TrainState:
    """Resume from ``run_dir``'s latest checkpoint, if any (else a fresh state)."""
    latest = read_latest(run_dir)
    if latest is None:
        return TrainState()
    load_model_weights(model, latest / MODEL_FILE)
    if (latest / OPTIMIZER_FILE).is_file():
        try:
            optimizer.load_state_dict(
                torch.load(latest / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            )
        except Exception as e:
            raise UserError(f"optimizer state in {latest} is corrupt ({type(e).__name__})") from None
    state = TrainState(**load_json(latest / STATE_FILE, "training state"))
    log.info("resumed from %s (step %d)", latest, state.step)
    return state


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    device: str = "cpu",
    checkpoint_every_s: float = 60.0,
    on_progress: Callable[[TrainState, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``shapes`` in ``run_dir`` until global step ``steps`` or for ``minutes``.

    ``minutes`` is the wall-clock budget of this call, tokenizer training included; a run
    directory that already has checkpoints resumes from the latest one.
    """
    if steps is None and minutes is None:
        raise UserError("say how long to train: --steps N or --minutes M")
    started = time.monotonic()
    deadline = started + minutes * 60 if minutes is not None else float("inf")
    run_file = run_dir / "run.json"
    if run_file.exists() and load_json(run_file, "run definition").get("preset") != cfg.preset:
        raise UserError(f"{run_dir} holds a run of another preset; use a new --out directory")
    needs_vq = not (run_dir / "vqvae.json").exists()
    vq_minutes = min(cfg.vq.train_minutes, 0.25 * minutes) if (needs_vq and minutes is not None) else None
    text_tokenizer, vqvae = prepare_tokenizers(cfg, run_dir, vq_minutes=vq_minutes, device=device)
    write_json_atomic(run_file, cfg.to_dict())

    model = build_model(cfg, device)
    optimizer = build_optimizer(model.param_groups(cfg.optim.weight_decay), cfg.optim)
    state = load_train_state(run_dir, model, optimizer)
    if steps is not None:
        state.schedule_total_steps = steps
    elif not state.schedule_total_steps:
        state.schedule_total_steps = cfg.optim.total_steps  # re-estimated below from the speed

    def set_lr() -> None:
        scale = lr_multiplier(state.step, cfg.optim, state.schedule_total_steps)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * scale

    batches = token_batches(cfg, text_tokenizer, vqvae, batch_size=cfg.optim.batch_size, device=device)
    model.train()
    loop_started = time.monotonic()
    first_step, last_save = state.step, time.monotonic()
    speed_estimated = steps is not None or state.step > 0
    loss_ema: float | None = None
    while (steps is None or state.step < steps) and time.monotonic() < deadline:
        set_lr()
        metrics = local_step(model, next(batches), optimizer, device=device)
        state.step += 1
        state.samples_seen += cfg.optim.batch_size
        loss_ema = metrics["loss"] if loss_ema is None else 0.95 * loss_ema + 0.05 * metrics["loss"]
        state.loss = loss_ema
        now = time.monotonic()
        if not speed_estimated and state.step - first_step >= 30:
            # Training by time: fit the cosine schedule to the steps this machine can do.
            rate = (state.step - first_step) / (now - loop_started)
            state.schedule_total_steps = state.step + int(rate * (deadline - now))
            speed_estimated = True
            log.info("schedule horizon set to %d steps (%.1f steps/s)", state.schedule_total_steps, rate)
        if state.step % 50 == 0:
            state.history.append({"step": state.step, "loss": round(loss_ema, 4)})
        if on_progress is not None:
            on_progress(state, metrics)
        if now - last_save >= checkpoint_every_s:
            state.elapsed_s += now - last_save
            last_save = now
            _save(run_dir, cfg, model, optimizer, state)
    state.elapsed_s += time.monotonic() - last_save
    _save(run_dir, cfg, model, optimizer, state)
    trained_s = max(time.monotonic() - loop_started, 1e-9)
    return TrainResult(run_dir, state, (state.step - first_step) * cfg.optim.batch_size / trained_s)


def _save(
    run_dir: Path,
    cfg: RunConfig,
    model: DalleTransformer,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
) -> None:
    save_checkpoint(
        run_dir,
        cfg_dict=cfg.to_dict(),
        model=model,
        state=asdict(state),
        optimizer_state=optimizer.state_dict(),
        keep=cfg.swarm.keep_checkpoints,
    )
