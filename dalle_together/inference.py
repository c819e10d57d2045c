"""Loading a trained checkpoint and drawing pictures from it: prompts in, uint8 images out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle_together.checkpoint import (
    MODEL_FILE,
    RUN_FILE,
    STATE_FILE,
    atomic_path,
    load_json,
    load_model_weights,
    resolve_checkpoint,
)
from dalle_together.config import RunConfig
from dalle_together.errors import UserError
from dalle_together.model import DalleTransformer
from dalle_together.sampling import sample_image_tokens
from dalle_together.tokenizers.text import TextTokenizer
from dalle_together.tokenizers.vqvae import VQVAE, load_vqvae, tensor_to_images

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SamplingOptions:
    """How to draw image tokens; the defaults were chosen by measuring on ``shapes``."""

    temperature: float = 0.5
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    """Classifier-free guidance; 1.0 turns it off."""
    batch_size: int = 64


@dataclass
class Bundle:
    """Everything needed to draw: the run's config, the transformer and both tokenizers."""

    cfg: RunConfig
    model: DalleTransformer
    text_tokenizer: TextTokenizer
    vqvae: VQVAE
    state: dict[str, Any]
    path: Path


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    """Load a checkpoint (a run directory's latest, or one step directory) for inference."""
    ckpt = resolve_checkpoint(path)
    try:
        cfg = RunConfig.from_dict(load_json(ckpt / RUN_FILE, "run definition"))
    except (KeyError, TypeError) as e:
        raise UserError(f"run definition in {ckpt} is corrupt ({e})") from None
    model = DalleTransformer(cfg.model)
    load_model_weights(model, ckpt / MODEL_FILE)
    state = load_json(ckpt / STATE_FILE, "training state") if (ckpt / STATE_FILE).exists() else {}
    return Bundle(
        cfg=cfg,
        model=model.to(device).eval(),
        text_tokenizer=TextTokenizer.load(ckpt),
        vqvae=load_vqvae(ckpt).to(device).eval(),
        state=state,
        path=ckpt,
    )


@torch.no_grad()
def generate_images(
    bundle: Bundle,
    prompts: list[str],
    *,
    seed: int = 0,
    options: SamplingOptions | None = None,
) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per prompt; the same seed gives the same images."""
    options = options or SamplingOptions()
    device = next(bundle.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = prompts[start : start + options.batch_size]
        text = torch.tensor([bundle.text_tokenizer.encode(p) for p in chunk], dtype=torch.long, device=device)
        codes = sample_image_tokens(
            bundle.model,
            text,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            guidance_scale=options.guidance_scale,
            generator=generator,
        )
        grid = bundle.cfg.model.image_grid
        pixels = bundle.vqvae.decode(codes.view(len(chunk), grid, grid))
        images.extend(tensor_to_images(pixels))
    return images


def make_grid(images: list[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """Tile equally sized images into one picture, ``columns`` per row, on a grey frame."""
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 64, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return grid


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> Path:
    """Write ``image`` as a PNG atomically, optionally enlarged with nearest-neighbour pixels."""
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path
