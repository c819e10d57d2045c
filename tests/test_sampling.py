"""Sampling: the cached and the recomputing path draw the same codes; seeds, filters, guidance."""

from __future__ import annotations

import pytest
import torch

from dalle_together.config import BOS_ID, ModelConfig
from dalle_together.model import DalleTransformer
from dalle_together.sampling import filter_logits, guided_logits, sample_image_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (the CI machine has 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(position: str = "learned", dtype: torch.dtype = torch.float64) -> DalleTransformer:
    """A small random model with every layout and shared blocks. float64 by default, so the two
    decoding paths cannot differ by rounding at a sampling boundary."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=32,
        depth=4,
        heads=2,
        head_dim=16,
        text_vocab_size=20,
        text_len=5,
        image_vocab_size=30,
        image_grid=4,
        layouts=("axial_row", "axial_col", "conv_like", "full"),
        block_ids=(0, 1, 0, 2),
        conv_kernel=3,
        position=position,
    )
    model = DalleTransformer(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper than at initialisation, so that filters and guidance matter
        model.image_emb.weight.mul_(5)
    return model


def captions(model: DalleTransformer, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, model.cfg.text_vocab_size, (batch, model.cfg.text_len), generator=g)
    text[:, 0] = BOS_ID
    return text


def sample(model: DalleTransformer, text: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    return sample_image_tokens(model, text, generator=torch.Generator().manual_seed(seed), **options)


SETTINGS = [
    {},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 0.9, "top_k": 10, "top_p": 0.9},
    {"guidance_scale": 3.0},
    {"guidance_scale": 2.0, "guidance_min_prob": 0.0, "top_k": 8},
    {"guidance_scale": 2.0, "temperature": 0.5, "top_p": 0.95},
    {"temperature": 0.0},
]


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize(
    "options", SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
def test_cached_and_uncached_give_the_same_tokens(options: dict, position: str) -> None:
    model = make_model(position)
    text = captions(model)
    cached = sample(model, text, use_cache=True, **options)
    uncached = sample(model, text, use_cache=False, **options)
    assert cached.equal(uncached)


def test_cached_and_uncached_agree_in_float32() -> None:
    """In float32 the logits of both paths differ by rounding only; the tokens agree (a flip would
    need a uniform draw within ~1e-6 of a probability boundary)."""
    model = make_model("rotary", dtype=torch.float32)
    text = captions(model, batch=4)
    for seed in range(3):
        assert sample(model, text, seed, use_cache=True).equal(sample(model, text, seed, use_cache=False))


def test_seeds() -> None:
    model = make_model()
    text = captions(model, batch=4)
    first = sample(model, text, seed=0)
    assert first.equal(sample(model, text, seed=0))
    assert not first.equal(sample(model, text, seed=1))


def test_output_shape_and_range() -> None:
    model = make_model()
    text = captions(model, batch=5)
    tokens = sample(model, text, temperature=2.0, guidance_scale=2.0)
    assert tokens.shape == (5, model.cfg.image_len) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < model.cfg.image_vocab_size
    assert len(tokens.unique()) > 5  # at temperature 2 the draws spread over the vocabulary


def test_top_k_1_is_greedy() -> None:
    model = make_model()
    text = captions(model)
    tokens = sample(model, text, top_k=1, temperature=1.0)
    assert tokens.equal(sample(model, text, seed=7, top_k=1))  # no randomness left
    assert tokens.equal(sample(model, text, temperature=0.0))
    # greedy by hand: the argmax of a full forward pass at every step
    image = text.new_zeros((text.shape[0], 0))
    with torch.no_grad():
        for _ in range(model.cfg.image_len):
            next_code = model(text, image).image[:, -1].argmax(-1)  # (B,)
            image = torch.cat([image, next_code[:, None]], 1)
    assert tokens.equal(image)


def test_sampling_restores_training_mode() -> None:
    model = make_model().train()
    sample(model, captions(model))
    assert model.training


def test_filter_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).log_softmax(-1)
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # about 0.09, 0.67, 0.24, 0.03
    kept = ~torch.isinf(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[False, True, False, False]] and probs[1] > 0.5
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[False, True, True, False]]
    assert not torch.isinf(filter_logits(logits, top_k=4, top_p=1.0)).any()


def test_guidance_filter() -> None:
    cond = torch.tensor([[0.0, 5.0, 1.0, -4.0]])
    uncond = torch.tensor([[0.0, 4.0, 3.0, -8.0]])
    plain = guided_logits(cond, uncond, scale=3.0, min_prob=0.0)
    torch.testing.assert_close(plain, (uncond + 3.0 * (cond - uncond)).double())
    # conditional probabilities: about 0.007, 0.976, 0.018, 0.0001; the last one would be pushed up
    filtered = guided_logits(cond, uncond, scale=3.0, min_prob=0.01)
    assert torch.isinf(filtered).tolist() == [[True, False, False, True]]
    everything_filtered = guided_logits(cond, uncond, scale=3.0, min_prob=0.999)
    assert (~torch.isinf(everything_filtered)).tolist() == [[False, True, False, False]]  # argmax kept


def test_guidance_scale_1_is_unguided() -> None:
    model = make_model()
    text = captions(model)
    assert sample(model, text, guidance_scale=1.0).equal(sample(model, text))


def test_rejects_bad_arguments() -> None:
    model = make_model()
    text = captions(model)
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample(model, text, **bad)
    with pytest.raises(ValueError):
        sample(model, text[:, :-1])
