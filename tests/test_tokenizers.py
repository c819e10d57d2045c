"""The text BPE and the VQ-VAE image tokenizer: layouts, round trips, persistence, a short training."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dalle_together.config import BOS_ID, PAD_ID, TextConfig, VQConfig
from dalle_together.data import ShapesStream, all_attributes, fixed_eval_set
from dalle_together.errors import UserError
from dalle_together.tokenizers.text import TEXT_TOKENIZER_FILE, UNK_ID, TextTokenizer
from dalle_together.tokenizers.vqvae import (
    CONFIG_FILE,
    VQVAE,
    WEIGHTS_FILE,
    images_to_tensor,
    load_vqvae,
    object_mask,
    psnr,
    save_vqvae,
    tensor_to_images,
    train_vqvae,
)

CAPTIONS = [a.caption for a in all_attributes("all")]

# --- text -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, TextConfig())


def test_every_caption_round_trips_and_fits(text_tok: TextTokenizer) -> None:
    cfg = TextConfig()
    assert text_tok.vocab_size <= cfg.vocab_size
    assert text_tok.text_len == cfg.text_len
    ids, truncated = text_tok.encode_batch(CAPTIONS)
    assert not any(truncated), "the longest caption must fit in text_len with <bos>"
    for caption, row in zip(CAPTIONS, ids, strict=True):
        assert text_tok.decode(row) == caption
        assert row.tolist() == text_tok.encode(caption)
    assert int(ids.max()) < text_tok.vocab_size


def test_layout_bos_padding_and_empty_caption(text_tok: TextTokenizer) -> None:
    ids = text_tok.encode("a small red circle in the center")
    assert len(ids) == text_tok.text_len
    assert ids[0] == BOS_ID
    n = text_tok.num_tokens("a small red circle in the center")
    assert ids[n:] == [PAD_ID] * (text_tok.text_len - n)
    assert PAD_ID not in ids[:n] and BOS_ID not in ids[1:]
    assert text_tok.encode("") == [BOS_ID] + [PAD_ID] * (text_tok.text_len - 1)
    assert text_tok.decode(text_tok.encode("")) == ""
    batch, truncated = text_tok.encode_batch(["", "a large blue square in the top left"])
    assert batch.dtype == torch.long and batch.shape == (2, text_tok.text_len)
    assert truncated == [False, False]


def test_case_and_spacing_are_normalised(text_tok: TextTokenizer) -> None:
    assert text_tok.encode("  A Large   RED circle in the Center ") == text_tok.encode(
        "a large red circle in the center"
    )


def test_unknown_symbols_become_unk_and_decode_skips_them(text_tok: TextTokenizer) -> None:
    ids = text_tok.encode("a red circle!")
    assert UNK_ID in ids
    assert text_tok.decode(ids) == "a red circle"


def test_long_prompt_is_truncated_with_flag_and_warning(
    text_tok: TextTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = " ".join(["a large red circle in the top left"] * 3)
    with caplog.at_level(logging.WARNING, logger="dalle_together.tokenizers.text"):
        ids, truncated = text_tok.encode_batch([long_prompt, "a small red circle in the center"])
    assert truncated == [True, False]
    assert ids.shape == (2, text_tok.text_len) and int(ids[0, 0]) == BOS_ID and PAD_ID not in ids[0].tolist()
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert text_tok.num_tokens(long_prompt) > text_tok.text_len
    with caplog.at_level(logging.WARNING, logger="dalle_together.tokenizers.text"):
        caplog.clear()
        assert text_tok.encode(long_prompt) == ids[0].tolist()
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_save_load_gives_identical_ids(text_tok: TextTokenizer, tmp_path) -> None:
    path = text_tok.save(tmp_path)
    assert path == tmp_path / TEXT_TOKENIZER_FILE
    assert [p.name for p in tmp_path.iterdir()] == [TEXT_TOKENIZER_FILE]  # no temp file left behind
    loaded = TextTokenizer.load(tmp_path)
    assert (loaded.vocab_size, loaded.text_len) == (text_tok.vocab_size, text_tok.text_len)
    assert torch.equal(loaded.encode_batch(CAPTIONS)[0], text_tok.encode_batch(CAPTIONS)[0])


def test_load_missing_or_corrupt_file_is_a_user_error(text_tok: TextTokenizer, tmp_path) -> None:
    with pytest.raises(UserError, match="no text tokenizer"):
        TextTokenizer.load(tmp_path)
    path = text_tok.save(tmp_path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(UserError, match="corrupt"):
        TextTokenizer.load(tmp_path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match="corrupt"):
        TextTokenizer.load(tmp_path)


def test_small_vocabulary_still_round_trips() -> None:
    tok = TextTokenizer.train(CAPTIONS, TextConfig(vocab_size=40, text_len=40))
    assert tok.vocab_size <= 40
    assert all(tok.decode(tok.encode(c)) == c for c in CAPTIONS[:20])
    with pytest.raises(UserError):
        TextTokenizer.train([], TextConfig())


# --- VQ-VAE -----------------------------------------------------------------------------------


def small_vq(image_size: int = 32) -> VQConfig:
    """Narrow and few codes, so that CPU tests take seconds."""
    return VQConfig(image_size=image_size, hidden_channels=32, codebook_size=64, code_dim=16, batch_size=16)


def shapes_images(n: int, image_size: int = 32) -> np.ndarray:
    return ShapesStream(image_size=image_size, seed=3, split="train").next_batch(n)[0]


def test_image_tensor_conversions_round_trip() -> None:
    images = shapes_images(4)
    x = images_to_tensor(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(tensor_to_images(x), images)
    with pytest.raises(ValueError):
        images_to_tensor(images.astype(np.float32))


def test_object_mask_covers_the_object_and_its_outline() -> None:
    images = np.zeros((1, 32, 32, 3), np.uint8)
    images[0, 10:15, 10:15] = (255, 128, 0)
    mask = object_mask(images_to_tensor(images))[0, 0].numpy()
    assert mask[9:16, 9:16].all()
    assert mask.sum() == 7 * 7


@pytest.mark.parametrize("image_size", [32, 64])
def test_encode_decode_shapes_and_ranges(image_size: int) -> None:
    torch.manual_seed(0)
    cfg = small_vq(image_size)
    model = VQVAE(cfg)
    x = images_to_tensor(shapes_images(6, image_size))
    recon, codes, commit = model(x)  # training mode: initialises the codebook by k-means
    assert recon.shape == x.shape and codes.shape == (6, cfg.grid_size, cfg.grid_size) and commit.ndim == 0
    model.eval()
    codes = model.encode(x)
    g = cfg.grid_size
    assert codes.shape == (6, g, g) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    images = model.decode(codes)
    assert images.shape == (6, 3, image_size, image_size)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    torch.testing.assert_close(model.decode(codes.flatten(1)), images)  # flat (B, g*g) codes too
    with pytest.raises(ValueError):
        model.decode(torch.full((1, g, g), cfg.codebook_size))
    with pytest.raises(ValueError):
        model.encode(torch.zeros(1, 3, image_size + 4, image_size + 4))


def test_encode_never_changes_the_codebook() -> None:
    torch.manual_seed(0)
    model = VQVAE(small_vq())
    x = images_to_tensor(shapes_images(8))
    model(x)  # k-means init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.encode(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_loss_has_parts_and_gradients() -> None:
    torch.manual_seed(0)
    model = VQVAE(small_vq())
    loss, parts = model.loss(images_to_tensor(shapes_images(8)))
    loss.backward()
    assert set(parts) >= {"loss", "recon_loss", "commit_loss", "mse"}
    assert all(np.isfinite(v) for v in parts.values())
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.fixture(scope="module")
def trained_small() -> tuple[VQVAE, dict[str, float]]:
    return train_vqvae(small_vq(), steps=60, minutes=2.0, eval_size=48)


def test_short_training_raises_held_out_psnr(trained_small: tuple[VQVAE, dict[str, float]]) -> None:
    model, metrics = trained_small
    barely, _ = train_vqvae(small_vq(), steps=2, eval_size=8)
    held_out = np.stack([s.image for s in fixed_eval_set("holdout", 40, 32, seed=5)])
    assert psnr(model, held_out) > psnr(barely, held_out) + 3.0
    assert not model.training
    assert metrics["steps"] == 60
    expected = {"psnr", "color_acc", "shape_acc", "position_acc", "size_acc", "codes_used", "seconds"}
    assert expected <= set(metrics)


def test_train_vqvae_reports_every_step_and_checks_budget() -> None:
    seen: list[int] = []
    train_vqvae(small_vq(), steps=3, eval_size=4, on_step=lambda step, parts: seen.append(step))
    assert seen == [1, 2, 3]
    with pytest.raises(UserError):
        train_vqvae(small_vq(), steps=0)


def test_save_load_gives_identical_codes_and_images(trained_small, tmp_path) -> None:
    model, _ = trained_small
    save_vqvae(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_vqvae(tmp_path)
    assert not loaded.training and loaded.cfg == model.cfg
    x = images_to_tensor(shapes_images(8))
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_load_missing_or_corrupt_files_is_a_user_error(trained_small, tmp_path) -> None:
    model, _ = trained_small
    with pytest.raises(UserError, match="missing"):
        load_vqvae(tmp_path)
    save_vqvae(model, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_vqvae(tmp_path)
    weights.write_bytes(good)
    config = tmp_path / CONFIG_FILE
    config.write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_vqvae(tmp_path)
    config.write_text(json.dumps({**json.loads(json.dumps(model.cfg.__dict__)), "codebook_size": 32}))
    with pytest.raises(UserError, match="do not match"):
        load_vqvae(tmp_path)
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        load_vqvae(tmp_path)


def test_vqgan_is_not_available_yet() -> None:
    with pytest.raises(UserError, match="VQGAN"):
        VQVAE(VQConfig(kind="vqgan", image_size=256, downsample=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_round_trip_on_cuda(tmp_path) -> None:
    model, metrics = train_vqvae(small_vq(), steps=5, eval_size=8, device="cuda")
    assert model.device.type == "cuda" and np.isfinite(metrics["psnr"])
    save_vqvae(model, tmp_path)
    x = images_to_tensor(shapes_images(4), "cuda")
    assert torch.equal(load_vqvae(tmp_path, device="cuda").encode(x), model.encode(x))
