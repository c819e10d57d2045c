"""Tokenizers: captions to text ids (:mod:`.text`), images to code grids and back (:mod:`.vqvae`).

Names are re-exported lazily: ``vector_quantize_pytorch`` takes seconds to import, and a
command that only needs the text tokenizer should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TextTokenizer": "text",
    "TEXT_TOKENIZER_FILE": "text",
    "VQVAE": "vqvae",
    "images_to_tensor": "vqvae",
    "tensor_to_images": "vqvae",
    "psnr": "vqvae",
    "reconstruct": "vqvae",
    "evaluate": "vqvae",
    "train_vqvae": "vqvae",
    "save_vqvae": "vqvae",
    "load_vqvae": "vqvae",
}

__all__ = [
    "TEXT_TOKENIZER_FILE",
    "VQVAE",
    "TextTokenizer",
    "evaluate",
    "images_to_tensor",
    "load_vqvae",
    "psnr",
    "reconstruct",
    "save_vqvae",
    "tensor_to_images",
    "train_vqvae",
]

if TYPE_CHECKING:
    from dalle_together.tokenizers.text import TEXT_TOKENIZER_FILE, TextTokenizer
    from dalle_together.tokenizers.vqvae import (
        VQVAE,
        evaluate,
        images_to_tensor,
        load_vqvae,
        psnr,
        reconstruct,
        save_vqvae,
        tensor_to_images,
        train_vqvae,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
