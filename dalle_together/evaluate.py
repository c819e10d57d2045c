"""Faithfulness of generated images, judged by a rule-based reader of their pixels.

For captions whose (colour, shape) pairs were seen in training and for the hold-out pairs that
never were, draw one image per caption, read its colour, shape, position and size back from the
pixels, and report per-attribute accuracy; hold-out accuracy measures compositional
generalisation. The image tokenizer's reconstruction PSNR bounds what the transformer can show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from dalle_together.data import all_attributes, fixed_eval_set
from dalle_together.inference import Bundle, SamplingOptions, generate_images
from dalle_together.reader import read_image, score
from dalle_together.tokenizers.vqvae import psnr

ATTRIBUTES = ("color", "shape", "position", "size")


@dataclass
class SplitResult:
    captions: list[str]
    correct: dict[str, list[bool]] = field(default_factory=dict)

    def accuracy(self) -> dict[str, float]:
        return {a: float(np.mean(v)) if v else float("nan") for a, v in self.correct.items()}


@dataclass
class EvalReport:
    seen: SplitResult
    holdout: SplitResult
    vqvae_psnr_db: float
    images: dict[str, list[np.ndarray]]

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": {"n": len(self.seen.captions), **self.seen.accuracy()},
            "holdout": {"n": len(self.holdout.captions), **self.holdout.accuracy()},
            "vqvae_psnr_db": round(self.vqvae_psnr_db, 2),
        }


def evaluate(
    bundle: Bundle,
    *,
    num_captions: int = 40,
    seed: int = 0,
    options: SamplingOptions | None = None,
) -> EvalReport:
    """Generate ``num_captions`` images per split and score each attribute of each."""
    rng = random.Random(seed)
    results: dict[str, SplitResult] = {}
    images: dict[str, list[np.ndarray]] = {}
    for split, pool_name in (("seen", "train"), ("holdout", "holdout")):
        pool = all_attributes(pool_name)
        chosen = [rng.choice(pool) for _ in range(num_captions)]
        drawn = generate_images(bundle, [a.caption for a in chosen], seed=seed, options=options)
        result = SplitResult(captions=[a.caption for a in chosen], correct={a: [] for a in ATTRIBUTES})
        for attrs, image in zip(chosen, drawn, strict=True):
            for name, ok in score(read_image(image), attrs).items():
                result.correct[name].append(bool(ok))
        results[split], images[split] = result, drawn
    held_out = np.stack([s.image for s in fixed_eval_set("train", 256, bundle.cfg.data.image_size, seed)])
    return EvalReport(
        seen=results["seen"],
        holdout=results["holdout"],
        vqvae_psnr_db=psnr(bundle.vqvae, held_out),
        images=images,
    )
