"""The rule-based reader: perfect on clean renders, robust to the blur a VQ-VAE decoder adds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from dalle_together.data import Attributes, all_attributes, render
from dalle_together.reader import Reading, read_image, score

ATTRIBUTE_NAMES = ("color", "shape", "position", "size")


def box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur with a black border."""
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
    h, w = image.shape[:2]
    blurred = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def down_up(image: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks, then upsample bilinearly: roughly the softness of a small decoder."""
    h = image.shape[0]
    small = image.astype(np.float32).reshape(h // 2, 2, h // 2, 2, 3).mean(axis=(1, 3))
    centres = (np.arange(h) + 0.5) / 2 - 0.5
    i0 = np.clip(np.floor(centres).astype(int), 0, h // 2 - 1)
    i1 = np.clip(i0 + 1, 0, h // 2 - 1)
    t = np.clip(centres - i0, 0, 1)
    rows = small[i0] * (1 - t)[:, None, None] + small[i1] * t[:, None, None]
    out = rows[:, i0] * (1 - t)[None, :, None] + rows[:, i1] * t[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def accuracy(image_size: int, degrade: Callable[[np.ndarray], np.ndarray], jitters: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    correct: Counter[str] = Counter()
    total = 0
    for attrs in all_attributes("all"):
        for _ in range(jitters):
            correct.update(score(read_image(degrade(render(attrs, image_size, rng))), attrs))
            total += 1
    return {name: correct[name] / total for name in ATTRIBUTE_NAMES}


@pytest.mark.parametrize("image_size", [32, 64])
def test_reads_every_clean_render(image_size: int) -> None:
    assert accuracy(image_size, lambda image: image, jitters=3) == dict.fromkeys(ATTRIBUTE_NAMES, 1.0)


@pytest.mark.parametrize("image_size", [32, 64])
def test_reads_through_blur_and_noise(image_size: int) -> None:
    noise = np.random.default_rng(1)

    def noisy(image: np.ndarray) -> np.ndarray:
        return np.clip(image + noise.normal(0, 10, image.shape), 0, 255).astype(np.uint8)

    # Measured: 1.0 on every attribute for each of these (seeds 3 and 7, 3 jitters each); at
    # 32 px, blur plus noise of sigma 20 drops shape to about 0.91 (small squares read as circles).
    for degrade in (box_blur, lambda x: box_blur(box_blur(x)), down_up, lambda x: noisy(box_blur(x))):
        result = accuracy(image_size, degrade, jitters=1)
        assert result["color"] == 1.0 and result["position"] == 1.0 and result["size"] == 1.0, result
        assert result["shape"] >= 0.97, result


def test_empty_and_near_black_images_read_as_unknown() -> None:
    assert read_image(np.zeros((32, 32, 3), np.uint8)) == Reading(None, None, None, None)
    faint = np.random.default_rng(0).integers(0, 30, (32, 32, 3)).astype(np.uint8)
    assert read_image(faint) == Reading()
    assert score(Reading(), Attributes("small", "red", "circle", "in the center")) == dict.fromkeys(
        ATTRIBUTE_NAMES, False
    )


def test_the_largest_blob_is_the_object() -> None:
    attrs = Attributes("large", "orange", "triangle", "in the bottom right")
    image = render(attrs, 32, np.random.default_rng(0))
    image[2:4, 2:4] = (0, 0, 255)  # a small, bright speck of another colour far from the object
    reading = read_image(box_blur(image))
    assert score(reading, attrs) == dict.fromkeys(ATTRIBUTE_NAMES, True), reading


def test_dim_objects_keep_their_hue() -> None:
    attrs = Attributes("small", "orange", "square", "in the top left")
    image = (render(attrs, 32, np.random.default_rng(0)) * 0.5).astype(np.uint8)  # (127, 64, 0)
    assert read_image(image).color == "orange"


def test_rejects_images_that_are_not_uint8_rgb() -> None:
    with pytest.raises(ValueError, match="uint8"):
        read_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        read_image(np.zeros((32, 32), np.uint8))
