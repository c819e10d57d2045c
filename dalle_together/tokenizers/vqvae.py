"""The image tokenizer: a small VQ-VAE that turns an image into a grid of discrete codes and back.

Data flow (``n = log2(downsample)`` halvings, ``C = hidden_channels``, ``D = code_dim``)::

    images (B, 3, H, W) in [0, 1]
      -> encoder: 3x3 conv to C/2^n channels, n strided 4x4 convs doubling the width up to C,
         2 residual blocks, 1x1 conv to D                       -> (B, D, g, g), g = H / downsample
      -> VectorQuantize (EMA codebook of ``codebook_size`` codes, k-means init, dead-code
         restarts, commitment loss)                             -> codes (B, g, g)
      -> decoder: 3x3 conv, 2 residual blocks, n transposed 4x4 convs halving the width,
         3x3 conv, sigmoid                                      -> (B, 3, H, W) in [0, 1]

Objects in ``shapes`` are small and the background is plain, so the reconstruction loss (squared
error plus a little cross-entropy, see :meth:`VQVAE.loss`) weighs pixels that differ from the
image's background (its per-channel median) ``object_weight`` times more than background pixels;
otherwise the decoder learns to paint a good background first and the shapes' edges last.

``train_vqvae`` fits one on the ``shapes`` training stream within a time budget; ``save_vqvae`` /
``load_vqvae`` store it as ``vqvae.safetensors`` + ``vqvae.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from dalle_together.checkpoint import atomic_path, write_json_atomic
from dalle_together.config import VQConfig
from dalle_together.errors import UserError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "vqvae.safetensors"
CONFIG_FILE = "vqvae.json"

BCE_WEIGHT = 0.1
"""Weight of the binary cross-entropy added to the squared error (see :meth:`VQVAE.loss`)."""
EVAL_SIZE = 240
"""Held-out images that ``train_vqvae`` evaluates on: every caption of the ``all`` split once."""


# ---------------------------------------------------------------------------------- conversions


def images_to_tensor(images: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [0, 1] -> uint8 ``(B, H, W, 3)`` (rounded, clipped)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def object_mask(images: torch.Tensor, *, threshold: float = 0.05) -> torch.Tensor:
    """Boolean ``(B, 1, H, W)``: pixels differing from the image's background (per-channel median).

    Dilated by one pixel so the object's outline, which decides its shape, counts as object too.
    """
    background = images.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    differs = (images - background).abs().amax(dim=1, keepdim=True) > threshold  # (B, 1, H, W)
    return F.max_pool2d(differs.float(), kernel_size=3, stride=1, padding=1) > 0


# ---------------------------------------------------------------------------------- the model


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``, as in the VQ-VAE paper."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _widths(cfg: VQConfig) -> list[int]:
    """Channels at each resolution, full resolution first: halved per level up from the code grid."""
    n = int(math.log2(cfg.downsample))
    return [max(cfg.hidden_channels >> (n - i), 8) for i in range(n)] + [cfg.hidden_channels]


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        w = _widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1)]
        for c_in, c_out in zip(w[:-1], w[1:], strict=True):
            layers += [nn.ReLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]  # halves H, W
        layers += [ResBlock(w[-1]), ResBlock(w[-1]), nn.ReLU(), nn.Conv2d(w[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 3, H, W) -> (B, D, g, g)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        w = _widths(cfg)[::-1]  # code grid first
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.code_dim, w[0], 3, padding=1),
            ResBlock(w[0]),
            ResBlock(w[0]),
        ]
        for c_in, c_out in zip(w[:-1], w[1:], strict=True):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]  # doubles H, W
        layers += [nn.ReLU(), nn.Conv2d(w[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, D, g, g) -> logits (B, 3, H, W); sigmoid gives the image


class VQVAE(nn.Module):
    """Images in [0, 1] to ``(B, g, g)`` codes in ``[0, codebook_size)`` and back.

    :param cfg: the tokenizer's configuration; ``kind='vqgan'`` is not available yet
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        if cfg.kind == "vqgan":
            raise UserError(
                "the pretrained VQGAN image tokenizer (the full preset's) is not available yet; "
                "use a preset with kind='vqvae'"
            )
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantize(
            dim=cfg.code_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=cfg.commitment_weight,
            accept_image_fmap=True,
            sync_codebook=False,
        )
        self.decoder = Decoder(cfg)

    @property
    def grid_size(self) -> int:
        return self.cfg.grid_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct; in training mode this also updates the codebook (EMA, dead-code restarts).

        :returns: reconstruction ``(B, 3, H, W)``, codes ``(B, g, g)``, weighted commitment loss
        """
        logits, codes, commit_loss = self._forward_logits(images)
        return torch.sigmoid(logits), codes, commit_loss

    def _forward_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_images(images)
        z = self.encoder(images)  # (B, D, g, g)
        quantized, codes, commit_loss = self.quantizer(z)  # (B, D, g, g), (B, g, g), ()
        return self.decoder(quantized), codes, commit_loss  # logits (B, 3, H, W)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images ``(B, 3, H, W)`` in [0, 1] -> int64 codes ``(B, g, g)``.

        Never updates a trained codebook (no EMA step, no restarts), in either mode. Only a model
        that has never run a training step initialises its codebook here, by k-means on ``images``.
        """
        self._check_images(images)
        z = self.encoder(images)  # (B, D, g, g)
        _, codes, _ = self.quantizer(z, freeze_codebook=True)  # (B, g, g)
        return codes.long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, g, g)`` or ``(B, g*g)`` (row-major) -> float images ``(B, 3, H, W)`` in [0, 1]."""
        g = self.grid_size
        if codes.ndim == 2 and codes.shape[1] == g * g:
            codes = codes.reshape(-1, g, g)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(
                f"expected codes of shape (B, {g}, {g}) or (B, {g * g}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size})")
        codes = codes.to(self.device, torch.long)
        quantized = self.quantizer.get_output_from_indices(codes)  # (B, D, g, g)
        return torch.sigmoid(self.decoder(quantized))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Object-weighted reconstruction loss plus commitment loss, and its parts as floats.

        Per pixel the reconstruction loss is the squared error plus ``BCE_WEIGHT`` times the
        binary cross-entropy of the sigmoid's logits. The squared error alone can get stuck: when
        the dark background wins early, the sigmoid saturates at 0 and its gradient vanishes
        (seen with ``object_weight=3``); the cross-entropy's gradient does not. The pixels'
        mean is weighted: object pixels weigh ``object_weight``, background pixels 1.
        """
        logits, codes, commit_loss = self._forward_logits(images)  # (B, 3, H, W)
        recon = torch.sigmoid(logits)
        weight = 1.0 + (self.cfg.object_weight - 1.0) * object_mask(images).float()  # (B, 1, H, W)
        squared = (recon - images).pow(2)  # (B, 3, H, W)
        bce = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
        per_pixel = (squared + BCE_WEIGHT * bce).mean(dim=1, keepdim=True)  # (B, 1, H, W)
        recon_loss = (weight * per_pixel).sum() / weight.sum()
        total = recon_loss + commit_loss
        parts = {
            "loss": float(total.detach()),
            "recon_loss": float(recon_loss.detach()),
            "commit_loss": float(commit_loss.detach()),
            "mse": float(squared.detach().mean()),
        }
        return total, parts

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruct(model: VQVAE, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> their uint8 reconstructions through the codes."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(images[i : i + batch_size], model.device)
        out.append(tensor_to_images(model.decode(model.encode(x))))
    return np.concatenate(out) if out else np.zeros_like(images)


def psnr(model: VQVAE, images: np.ndarray, *, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB, peak 1.0) of the model's uint8 reconstructions of uint8 ``images``."""
    return _mean_psnr_db(images, reconstruct(model, images, batch_size=batch_size))


def _mean_psnr_db(images: np.ndarray, recon: np.ndarray) -> float:
    mse = ((recon.astype(np.float64) - np.asarray(images, dtype=np.float64)) / 255.0) ** 2  # (B, H, W, 3)
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse.mean(axis=(1, 2, 3)), 1e-10))))


def evaluate(model: VQVAE, samples: Sequence[Any], *, batch_size: int = 256) -> dict[str, float]:
    """PSNR, the reader's per-attribute accuracy and codebook use on reconstructions of ``samples``.

    :param samples: ``shapes`` samples (``.image`` uint8 ``(H, W, 3)``, ``.attrs``)
    """
    from dalle_together.reader import read_image, score

    was_training = model.training
    model.eval()
    images = np.stack([s.image for s in samples])
    codes = torch.cat(
        [
            model.encode(images_to_tensor(images[i : i + batch_size], model.device))
            for i in range(0, len(images), batch_size)
        ]
    )
    recon = np.concatenate(
        [tensor_to_images(model.decode(codes[i : i + batch_size])) for i in range(0, len(codes), batch_size)]
    )
    metrics = {"psnr": _mean_psnr_db(images, recon)}
    hits: dict[str, list[bool]] = {}
    for image, sample in zip(recon, samples, strict=True):
        for name, ok in score(read_image(image), sample.attrs).items():
            hits.setdefault(name, []).append(ok)
    metrics.update({f"{name}_acc": float(np.mean(oks)) for name, oks in hits.items()})
    metrics["codes_used"] = int(torch.unique(codes).numel())
    model.train(was_training)
    return metrics


# ---------------------------------------------------------------------------------- training


def train_vqvae(
    cfg: VQConfig,
    *,
    seed: int = 0,
    minutes: float | None = None,
    steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    device: str | torch.device = "cpu",
    eval_size: int = EVAL_SIZE,
) -> tuple[VQVAE, dict[str, float]]:
    """Train a VQ-VAE on the ``shapes`` training stream; stop at ``minutes`` or ``steps``, whichever first.

    The learning rate follows a cosine from ``cfg.lr`` to 5% of it over the budget (the larger of
    the elapsed fractions of time and steps), so a run that ends on time ends annealed.

    :param seed: seeds the weights and the training stream
    :param minutes: wall-clock budget for the training steps (default ``cfg.train_minutes``)
    :param steps: step budget (default ``cfg.train_steps``)
    :param on_step: called after every step with the step number (1-based) and the loss parts
    :param device: where to train, e.g. ``"cuda"``
    :param eval_size: held-out images (``fixed_eval_set("all", ...)``) for the final metrics
    :returns: the model in eval mode, and the final metrics: ``steps``, ``seconds``, ``loss`` (mean
        over the last 50 steps), ``psnr``, ``color_acc``, ``shape_acc``, ``position_acc``,
        ``size_acc`` (the reader on reconstructions), ``codes_used``
    """
    from dalle_together.data.shapes import ShapesStream, fixed_eval_set

    minutes = cfg.train_minutes if minutes is None else minutes
    steps = cfg.train_steps if steps is None else steps
    if minutes <= 0 or steps <= 0:
        raise UserError(f"training budget must be positive, got minutes={minutes}, steps={steps}")
    budget_s = 60.0 * minutes
    device = torch.device(device)
    torch.manual_seed(seed)
    model = VQVAE(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    stream = ShapesStream(image_size=cfg.image_size, seed=seed, worker=0, split="train")

    recent: list[float] = []
    step, start = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / budget_s, step / steps)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        images, _ = stream.next_batch(cfg.batch_size)
        loss, parts = model.loss(images_to_tensor(images, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        recent = [*recent[-49:], parts["loss"]]
        if on_step is not None:
            on_step(
                step, {**parts, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
            )
    seconds = time.perf_counter() - start

    model.eval()
    metrics: dict[str, float] = {
        "steps": step,
        "seconds": seconds,
        "loss": float(np.mean(recent)) if recent else math.nan,
    }
    metrics.update(evaluate(model, fixed_eval_set("all", eval_size, cfg.image_size, seed)))
    logger.info("VQ-VAE trained: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return model, metrics


# ---------------------------------------------------------------------------------- persistence


def save_vqvae(model: VQVAE, directory: str | os.PathLike[str]) -> None:
    """Write ``vqvae.safetensors`` (weights and codebook) and ``vqvae.json`` (its VQConfig) atomically."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "dalle-together-vqvae"})
    write_json_atomic(directory / CONFIG_FILE, dataclasses.asdict(model.cfg))


def load_vqvae(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> VQVAE:
    """The VQ-VAE saved in ``directory``, in eval mode; missing or corrupt files are a :class:`UserError`."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"no VQ-VAE at {directory}: {path.name} is missing (train one with train-vqvae)")
    try:
        cfg = VQConfig(**json.loads(config_path.read_text()))
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise UserError(f"VQ-VAE config {config_path} is corrupt or unreadable ({e})") from e
    model = VQVAE(cfg)
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise UserError(
            f"VQ-VAE weights {weights_path} are corrupt or do not match {config_path.name} ({e})"
        ) from e
    return model.to(device).eval()
