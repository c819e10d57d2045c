"""The built-in ``shapes`` data set: one coloured object on black, with its caption.

Captions are exactly ``a {size} {color} {shape} {position}``, e.g. ``a small red circle in the top
left``: 2 sizes x 8 colours x 3 shapes x 5 positions = 240 captions. Images are drawn procedurally
(numpy only), deterministically from a seed, fast enough to feed training without a cache.

Rendering details matter for a 32 px image (see ``shared/notes/shapes-calibration.md``): objects
have an odd side (7 px small, 13 px large at 32 px, scaled with the image) and are centred on a
pixel centre, so a small circle stays round instead of becoming a 6x6 blob that reads as a square.

Hold-out pairs. The (colour, shape) pairs in :data:`HOLDOUT_PAIRS` never appear in training:

- red triangle, green circle, blue square, white triangle

Every colour still appears in training with at least two shapes and every shape with at least six
colours, so a model that composes attributes can draw them; evaluation measures that on the
``holdout`` split (all sizes and positions of these four pairs, 40 of the 240 captions).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from dalle_together.config import DataConfig
from dalle_together.errors import UserError

Split = Literal["train", "holdout", "all"]
SPLITS: tuple[str, ...] = ("train", "holdout", "all")

SIZES: dict[str, float] = {"small": 0.2, "large": 0.4}
"""Size name -> side of the object as a fraction of the image side (rounded to an odd pixel count)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
"""Colour name -> pure RGB value; the image holds exactly these values and black."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left": (0.25, 0.25),
    "in the top right": (0.75, 0.25),
    "in the bottom left": (0.25, 0.75),
    "in the bottom right": (0.75, 0.75),
    "in the center": (0.5, 0.5),
}
"""Position phrase -> centre of the object as fractions (x, y) of the image side."""

HOLDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("white", "triangle")}
)
"""(colour, shape) pairs that never appear in training; the ``holdout`` split draws only these."""

JITTER_AT_32PX = 2
"""Largest shift of the object's centre, per axis, at 32 px (scaled with the image side)."""

_SUPERSAMPLE = 8
"""Sub-pixel samples per axis when rasterising: a pixel is inside if half of it is covered."""

_CAPTION_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})"
)


@dataclass(frozen=True)
class Attributes:
    """What one image shows; ``caption`` and :meth:`parse` convert to and from text."""

    size: str
    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("size", self.size, SIZES),
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose from {list(choices)}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position}"

    @property
    def is_holdout(self) -> bool:
        return (self.color, self.shape) in HOLDOUT_PAIRS

    @classmethod
    def parse(cls, caption: str) -> Attributes | None:
        """The attributes of a caption in the data set's grammar, or None if it is not one.

        Case and runs of whitespace are forgiven; any other word is not.
        """
        match = _CAPTION_RE.fullmatch(" ".join(caption.lower().split()))
        if match is None:
            return None
        return cls(*match.groups())


@dataclass(frozen=True, eq=False)
class Sample:
    image: np.ndarray
    """(H, W, 3) uint8."""
    caption: str
    attrs: Attributes


def all_attributes(split: Split) -> list[Attributes]:
    """Every attribute combination of a split, in a fixed order (train: 200, holdout: 40, all: 240)."""
    _check_split(split)
    combos = (Attributes(*c) for c in itertools.product(SIZES, COLORS, SHAPES, POSITIONS))
    if split == "all":
        return list(combos)
    want_holdout = split == "holdout"
    return [a for a in combos if a.is_holdout == want_holdout]


def object_size_px(size: str, image_size: int) -> int:
    """Side of the object's bounding box in pixels: the odd number nearest to its fraction of the image."""
    return 2 * round((SIZES[size] * image_size - 1) / 2) + 1


def jitter_px(image_size: int) -> int:
    """Largest shift of an object's centre per axis: 2 px at 32 px, scaled with the side."""
    return max(1, round(JITTER_AT_32PX * image_size / 32))


def render(attrs: Attributes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 image of ``attrs``; ``rng`` draws the jitter of the object's centre."""
    _check_image_size(image_size)
    side = object_size_px(attrs.size, image_size)
    half = side // 2
    jitter = jitter_px(image_size)
    fx, fy = POSITIONS[attrs.position]
    # The object is centred on pixel (cx, cy); clipping keeps all of it inside the frame.
    dx, dy = rng.integers(-jitter, jitter + 1, size=2)
    cx = min(max(int(fx * image_size) + int(dx), half), image_size - 1 - half)
    cy = min(max(int(fy * image_size) + int(dy), half), image_size - 1 - half)
    footprint = _mask(attrs.shape, side)  # (side, side) bool
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    image[cy - half : cy + half + 1, cx - half : cx + half + 1][footprint] = COLORS[attrs.color]
    return image


class ShapesStream:
    """An infinite, seeded stream of samples; iterate it, or take batches with :meth:`next_batch`.

    Each ``(seed, worker)`` is its own stream (``numpy.random.SeedSequence`` with spawn key
    ``(worker,)``): statistically independent of every other worker's and reproducible. Taking
    ``next_batch(n)`` gives the same samples as ``n`` calls of ``next()``.
    """

    def __init__(
        self, *, image_size: int = 32, seed: int = 0, worker: int = 0, split: Split = "train"
    ) -> None:
        """
        :param image_size: side of the square images in pixels (at least 16)
        :param seed: seed of the whole run; every worker shares it
        :param worker: index of this volunteer/peer; each worker draws its own independent stream
        :param split: ``train`` never draws a hold-out pair, ``holdout`` draws only those
        """
        _check_image_size(image_size)
        _check_split(split)
        if seed < 0 or worker < 0:
            raise UserError(f"seed and worker must be non-negative, got seed={seed}, worker={worker}")
        self.image_size = image_size
        self.seed = seed
        self.worker = worker
        self.split = split
        self._choices = all_attributes(split)
        self._rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(worker,)))

    @classmethod
    def from_config(cls, config: DataConfig, *, worker: int = 0, split: Split = "train") -> ShapesStream:
        return cls(image_size=config.image_size, seed=config.seed, worker=worker, split=split)

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        attrs = self._choices[int(self._rng.integers(len(self._choices)))]
        return Sample(render(attrs, self.image_size, self._rng), attrs.caption, attrs)

    def next_batch(self, n: int) -> tuple[np.ndarray, list[str]]:
        """``n`` images as one (n, H, W, 3) uint8 array, and their captions."""
        images = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        captions = []
        for i in range(n):
            sample = next(self)
            images[i] = sample.image
            captions.append(sample.caption)
        return images, captions


def fixed_eval_set(split: Split, n: int, image_size: int = 32, seed: int = 0) -> list[Sample]:
    """``n`` samples that depend only on the arguments, for evaluation (reader accuracy, PSNR).

    The split's captions are shuffled once and cycled, so any ``n`` covers as many distinct
    captions as it can (``n = 40`` on ``holdout`` shows each once); jitters are random.
    The seed is separate from the training streams' (its own spawn key), so ``seed=0`` here
    does not replay worker 0's training images.
    """
    _check_image_size(image_size)
    choices = all_attributes(split)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**32 - 1, SPLITS.index(split))))
    order = rng.permutation(len(choices))
    attrs = [choices[int(order[i % len(choices)])] for i in range(n)]
    return [Sample(render(a, image_size, rng), a.caption, a) for a in attrs]


@lru_cache(maxsize=64)
def _mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) footprint of a shape: pixels at least half covered by the ideal figure."""
    # Sub-pixel sample centres in units of the object's side, origin at its centre: [-0.5, 0.5).
    t = (np.arange(side * _SUPERSAMPLE) + 0.5) / (side * _SUPERSAMPLE) - 0.5
    y, x = np.meshgrid(t, t, indexing="ij")
    if shape == "circle":
        inside = x**2 + y**2 <= 0.25
    elif shape == "square":
        inside = np.ones_like(x, dtype=bool)
    elif shape == "triangle":
        # Apex at the top centre, base the full width at the bottom: half-width grows from 0 to 0.5.
        inside = np.abs(x) <= (y + 0.5) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    coverage = inside.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(1, 3))
    mask = coverage >= 0.5
    mask.flags.writeable = False
    return mask


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {list(SPLITS)}")


def _check_image_size(image_size: int) -> None:
    if image_size < 16:
        raise UserError(f"image side must be at least 16 px, got {image_size}")
