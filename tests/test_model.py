"""The transformer: masks, causality, sharing, parameter counts, loss, checkpointing, KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dalle_together.config import BOS_ID, PAD_ID, ModelConfig, preset
from dalle_together.errors import UserError
from dalle_together.model import (
    DalleTransformer,
    build_attention_mask,
    empty_captions,
    rotary_positions,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (the CI machine has 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LAYOUTS = ("full", "axial_row", "axial_col", "conv_like")


def tiny(**changes) -> ModelConfig:
    """The tiny preset's model config with some fields changed."""
    return dataclasses.replace(preset("tiny").model, **changes)


def small_test_config(**changes) -> ModelConfig:
    """2 layers, width 32, 4x4 grid: fast enough to run many times per test."""
    base = dict(
        dim=32,
        depth=2,
        heads=2,
        head_dim=16,
        text_vocab_size=20,
        text_len=5,
        image_vocab_size=30,
        image_grid=4,
        layouts=("full", "full"),
        block_ids=(0, 1),
        conv_kernel=3,
    )
    return ModelConfig(**{**base, **changes})


def random_batch(cfg: ModelConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    text[:, 0] = BOS_ID
    image = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_len), generator=g)
    return text, image


# ---- masks ---------------------------------------------------------------------------------------

TEXT_LEN, GRID = 3, 4  # sequence: text 0..2, image 3..18 (image token (r, c) at 3 + 4r + c)


def img(r: int, c: int) -> int:
    return TEXT_LEN + r * GRID + c


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_common_rules(layout: str) -> None:
    mask = build_attention_mask(layout, TEXT_LEN, GRID, conv_kernel=3)
    T = TEXT_LEN + GRID * GRID
    assert mask.shape == (T, T) and mask.dtype == torch.bool
    assert mask.diagonal().all(), "every token attends to itself"
    assert not mask.triu(1).any(), "no token sees the future"
    assert mask[:TEXT_LEN, :TEXT_LEN].equal(torch.ones(TEXT_LEN, TEXT_LEN, dtype=torch.bool).tril())
    assert not mask[:TEXT_LEN, TEXT_LEN:].any(), "text cannot see image"
    assert mask[TEXT_LEN:, :TEXT_LEN].all(), "image sees all text"


def test_mask_full_is_causal() -> None:
    mask = build_attention_mask("full", TEXT_LEN, GRID, conv_kernel=3)
    T = TEXT_LEN + GRID * GRID
    assert mask.equal(torch.ones(T, T, dtype=torch.bool).tril())


def test_mask_axial_row() -> None:
    mask = build_attention_mask("axial_row", TEXT_LEN, GRID, conv_kernel=3)
    assert mask[img(2, 3), img(2, 0)] and mask[img(2, 3), img(2, 2)]  # same row, earlier
    assert not mask[img(2, 1), img(2, 2)]  # same row, later
    assert not mask[img(2, 0), img(1, 3)]  # previous token in raster order, other row
    assert not mask[img(2, 3), img(1, 3)]  # same column, other row
    assert mask[img(2, 3), TEXT_LEN:].sum() == 4 and mask[img(2, 0), TEXT_LEN:].sum() == 1


def test_mask_axial_col() -> None:
    mask = build_attention_mask("axial_col", TEXT_LEN, GRID, conv_kernel=3)
    assert mask[img(3, 1), img(0, 1)] and mask[img(3, 1), img(2, 1)]  # same column, earlier rows
    assert not mask[img(1, 1), img(2, 1)]  # same column, later row
    assert not mask[img(3, 1), img(3, 0)]  # same row, other column
    assert mask[img(3, 1), TEXT_LEN:].sum() == 4 and mask[img(0, 2), TEXT_LEN:].sum() == 1


def test_mask_conv_like_window() -> None:
    mask = build_attention_mask("conv_like", TEXT_LEN, GRID, conv_kernel=3)
    q = img(2, 2)
    seen = {(r, c) for r in range(GRID) for c in range(GRID) if mask[q, img(r, c)]}
    # 3x3 window centred on (2, 2), causal in raster order: the row above (cols 1..3) and (2, 1), (2, 2)
    assert seen == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}
    seen_corner = {(r, c) for r in range(GRID) for c in range(GRID) if mask[img(1, 0), img(r, c)]}
    assert seen_corner == {(0, 0), (0, 1), (1, 0)}
    wide = build_attention_mask("conv_like", TEXT_LEN, GRID, conv_kernel=5)
    assert wide[img(3, 3), img(1, 1)] and not wide[img(3, 3), img(0, 3)]


def test_mask_unknown_layout() -> None:
    with pytest.raises(UserError):
        build_attention_mask("diagonal", TEXT_LEN, GRID, conv_kernel=3)


def test_masks_shared_per_layout() -> None:
    cfg = small_test_config(
        depth=4, layouts=("axial_row", "axial_col", "axial_row", "conv_like"), block_ids=(0, 1, 0, 1)
    )
    model = DalleTransformer(cfg)
    masks = dict(model.named_buffers())
    assert set(masks) == {"mask_axial_row", "mask_axial_col", "mask_conv_like"}
    assert model.mask_for_layer(0) is model.mask_for_layer(2)
    assert "mask_axial_row" not in model.state_dict(), "masks are not saved in checkpoints"


def test_rotary_positions() -> None:
    pos = rotary_positions(text_len=3, grid=4)
    assert pos[:3].tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
    assert pos[img(2, 1)].tolist() == [3, 2, 1]


# ---- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(layout: str, position: str) -> None:
    torch.manual_seed(0)
    cfg = small_test_config(layouts=(layout, layout), position=position)
    model = DalleTransformer(cfg).eval()
    text, image = random_batch(cfg, batch=2)
    image_in = image[:, :-1]  # positions 0 .. T-2
    before = model(text, image_in)
    for changed in (2, cfg.text_len + 5):  # a text position and an image position
        text2, image2 = text.clone(), image_in.clone()
        if changed < cfg.text_len:
            text2[:, changed] = (text2[:, changed] + 1) % cfg.text_vocab_size
        else:
            image2[:, changed - cfg.text_len] = (image2[:, changed - cfg.text_len] + 1) % cfg.image_vocab_size
        after = model(text2, image2)
        # text logits come from positions 0..text_len-2, image logits from text_len-1 onwards
        n_text = min(changed, cfg.text_len - 1)  # text-predicting positions before `changed`
        n_image = max(changed - (cfg.text_len - 1), 0)  # image-predicting positions before `changed`
        torch.testing.assert_close(after.text[:, :n_text], before.text[:, :n_text], rtol=0, atol=1e-6)
        torch.testing.assert_close(after.image[:, :n_image], before.image[:, :n_image], rtol=0, atol=1e-6)
        assert not torch.allclose(after.image[:, n_image], before.image[:, n_image])  # it does see itself


# ---- parameters and sharing ----------------------------------------------------------------------


def block_params(dim: int, heads: int, head_dim: int, mlp_ratio: int) -> int:
    inner, hidden = heads * head_dim, mlp_ratio * dim
    return (
        2 * dim  # ln1
        + dim * 3 * inner  # qkv, no bias
        + inner * dim
        + dim  # attention output
        + 2 * dim  # ln2
        + dim * hidden
        + hidden  # mlp in
        + hidden * dim
        + dim  # mlp out
    )


def test_tiny_parameter_count_formula() -> None:
    cfg = preset("tiny").model
    model = DalleTransformer(cfg)
    per_block = block_params(cfg.dim, cfg.heads, cfg.head_dim, cfg.mlp_ratio)
    embeddings = (cfg.text_vocab_size + cfg.image_vocab_size) * cfg.dim  # tied: no separate heads
    positions = (cfg.text_len + 2 * cfg.image_grid) * cfg.dim  # text table, row table, column table
    expected = cfg.num_unique_blocks * per_block + embeddings + positions + 2 * cfg.dim  # + final LN
    assert model.num_parameters() == expected == 877_312


def test_untied_heads_add_parameters() -> None:
    cfg = preset("tiny").model
    untied = DalleTransformer(dataclasses.replace(cfg, tie_embeddings=False))
    extra = (cfg.text_vocab_size + cfg.image_vocab_size) * cfg.dim
    assert untied.num_parameters() == DalleTransformer(cfg).num_parameters() + extra


def test_sharing_depth_does_not_add_parameters() -> None:
    deep = DalleTransformer(tiny(depth=8, layouts=("full",) * 8, block_ids=(0, 1) * 4))
    shallow = DalleTransformer(tiny(depth=2, layouts=("full",) * 2, block_ids=(0, 1)))
    assert len(deep.blocks) == 2
    assert deep.num_parameters() == shallow.num_parameters()
    assert deep.block_for_layer(0) is deep.block_for_layer(6) and deep.block_for_layer(
        1
    ) is deep.block_for_layer(7)


def test_full_preset_on_meta_device() -> None:
    cfg = preset("full").model
    with torch.device("meta"):
        model = DalleTransformer(cfg)
    assert cfg.depth == 64 and len(model.blocks) == 5
    assert [cfg.block_ids[i] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3] and cfg.block_ids[62] == 2
    assert model.block_for_layer(63) is model.blocks[4] and model.block_for_layer(0) is model.block_for_layer(
        60
    )
    assert cfg.layouts[:5] == ("axial_row", "axial_col", "axial_row", "axial_row", "axial_row")
    assert cfg.layouts[-1] == "conv_like" and cfg.layouts.count("conv_like") == 1
    assert cfg.layouts.count("axial_col") == 16  # layers 1, 5, ..., 61
    assert model.mask_for_layer(1).shape == (1280, 1280)  # 256 text + 32*32 image tokens
    assert model.mask_for_layer(0) is model.mask_for_layer(2)

    # By hand. Per block (dim 1024, 16 heads of 64, MLP 4096):
    #   ln1                 2 * 1024             =      2_048
    #   qkv (no bias)       1024 * 3072          =  3_145_728
    #   attention output    1024 * 1024 + 1024   =  1_049_600
    #   ln2                 2 * 1024             =      2_048
    #   MLP in              1024 * 4096 + 4096   =  4_198_400
    #   MLP out             4096 * 1024 + 1024   =  4_195_328
    #   block total                              = 12_593_152
    # 5 unique blocks (layers 0..62 cycle over 4, layer 63 has its own): 5 * 12_593_152 = 62_965_760
    # text embedding 32_100 * 1024 = 32_870_400; image embedding 8192 * 1024 = 8_388_608
    # (tied: the output heads reuse them; rotary positions: no position tables)
    # final LayerNorm 2 * 1024 = 2_048
    # total 62_965_760 + 32_870_400 + 8_388_608 + 2_048 = 104_226_816
    per_block = 2_048 + 3_145_728 + 1_049_600 + 2_048 + 4_198_400 + 4_195_328
    assert per_block == 12_593_152 == block_params(1024, 16, 64, 4)
    assert model.num_parameters() == 5 * per_block + 32_870_400 + 8_388_608 + 2_048 == 104_226_816


def test_param_groups() -> None:
    model = DalleTransformer(preset("tiny").model)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n = lambda group: sum(p.numel() for p in group["params"])  # noqa: E731
    assert n(decay) + n(no_decay) == model.num_parameters()
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.text_emb.weight) not in decay_ids and id(model.text_pos) not in decay_ids
    assert (
        id(model.blocks[0].attn.qkv.weight) in decay_ids and id(model.blocks[0].mlp.fc.bias) not in decay_ids
    )
    assert id(model.blocks[0].ln1.weight) not in decay_ids
    assert all(p.dim() == 2 for p in decay["params"])


# ---- loss and training ---------------------------------------------------------------------------


def test_loss_shapes_and_metrics() -> None:
    torch.manual_seed(0)
    cfg = small_test_config()
    model = DalleTransformer(cfg).eval()
    text, image = random_batch(cfg, batch=3)
    logits = model(text, image[:, :-1])
    assert logits.text.shape == (3, cfg.text_len - 1, cfg.text_vocab_size)
    assert logits.image.shape == (3, cfg.image_len, cfg.image_vocab_size)
    loss, metrics = model.loss(text, image)
    assert set(metrics) == {"loss", "text_loss", "image_loss"}
    w_t, w_i = cfg.text_loss_weight, cfg.image_loss_weight
    expected = (w_t * metrics["text_loss"] + w_i * metrics["image_loss"]) / (w_t + w_i)
    assert loss.item() == pytest.approx(expected) == pytest.approx(metrics["loss"])


def test_loss_weights() -> None:
    torch.manual_seed(0)
    text_only = DalleTransformer(small_test_config(text_loss_weight=1.0, image_loss_weight=0.0)).eval()
    text, image = random_batch(text_only.cfg, batch=2)
    loss, metrics = text_only.loss(text, image)
    assert loss.item() == pytest.approx(metrics["text_loss"])
    other_image = (image + 1) % text_only.cfg.image_vocab_size
    assert text_only.loss(text, other_image)[0].item() == pytest.approx(loss.item())  # images do not matter
    image_only = DalleTransformer(small_test_config(text_loss_weight=0.0, image_loss_weight=1.0)).eval()
    loss, metrics = image_only.loss(text, image)
    assert loss.item() == pytest.approx(metrics["image_loss"])
    with pytest.raises(UserError):
        DalleTransformer(small_test_config(text_loss_weight=0.0, image_loss_weight=0.0))


def test_text_loss_ignores_padding() -> None:
    torch.manual_seed(0)
    model = DalleTransformer(small_test_config()).eval()
    text, image = random_batch(model.cfg, batch=2)
    text[:, 3:] = PAD_ID
    logits = model(text, image[:, :-1])
    expected = torch.nn.functional.cross_entropy(
        logits.text[:, :2].reshape(-1, model.cfg.text_vocab_size), text[:, 1:3].reshape(-1)
    )
    assert model.loss(text, image)[1]["text_loss"] == pytest.approx(expected.item(), rel=1e-5)
    empty = empty_captions(2, model.cfg.text_len)
    assert model.loss(empty, image)[1]["text_loss"] == 0.0  # nothing to predict, not NaN


def test_caption_dropout_rate() -> None:
    torch.manual_seed(0)
    model = DalleTransformer(small_test_config(caption_dropout=0.25))
    text, _ = random_batch(model.cfg, batch=4000)
    dropped = model.train().drop_captions(text)
    empty = empty_captions(1, model.cfg.text_len)
    is_empty = (dropped == empty).all(1)
    assert empty[0].tolist() == [BOS_ID] + [PAD_ID] * (model.cfg.text_len - 1)
    assert 0.22 < is_empty.float().mean().item() < 0.28  # 0.25 +- ~4 standard deviations
    assert dropped[~is_empty].equal(text[~is_empty])  # the others are untouched
    assert model.eval().drop_captions(text) is text  # never in eval mode


def test_gradient_checkpointing_same_gradients() -> None:
    cfg = small_test_config(
        depth=4,
        layouts=("axial_row", "axial_col", "full", "conv_like"),
        block_ids=(0, 1, 0, 1),
        position="rotary",
        caption_dropout=0.0,
    )
    text, image = random_batch(cfg, batch=2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DalleTransformer(dataclasses.replace(cfg, gradient_checkpointing=checkpointing)).train()
        loss, _ = model.loss(text, image)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_overfits_a_single_batch(position: str) -> None:
    torch.manual_seed(0)
    cfg = small_test_config(position=position, layouts=("axial_row", "conv_like"), caption_dropout=0.0)
    model = DalleTransformer(cfg).train()
    text, image = random_batch(cfg, batch=4)
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, metrics = model.loss(text, image)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
    assert losses[-1] < 0.5 * losses[0], losses


# ---- incremental decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_cached_logits_equal_full_forward(position: str) -> None:
    torch.manual_seed(0)
    cfg = small_test_config(
        depth=4,
        layouts=("axial_row", "axial_col", "conv_like", "full"),
        block_ids=(0, 1, 0, 1),
        position=position,
    )
    model = DalleTransformer(cfg).eval()
    text, image = random_batch(cfg, batch=2)
    with torch.no_grad():
        full = model(text, image[:, :-1])
        cache = model.new_cache()
        prefill = model.forward_with_cache(text[:, :3], cache, 0)  # part of the caption...
        rest = model.forward_with_cache(
            torch.cat([text[:, 3:], image[:, :2]], 1), cache, 3
        )  # ...across the boundary
        steps = [
            model.forward_with_cache(image[:, k : k + 1], cache, cfg.text_len + k).image
            for k in range(2, cfg.image_len - 1)
        ]
    assert cache.length == cfg.seq_len - 1
    assert len(cache.keys) == cfg.depth and cache.keys[0] is not cache.keys[2]  # per layer, not per block
    torch.testing.assert_close(torch.cat([prefill.text, rest.text], 1), full.text, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([rest.image, *steps], 1), full.image, rtol=0, atol=1e-5)


def test_forward_rejects_bad_lengths() -> None:
    model = DalleTransformer(small_test_config())
    text, image = random_batch(model.cfg, batch=1)
    with pytest.raises(ValueError):
        model(text, image)  # the last image token predicts nothing
    with pytest.raises(ValueError):
        model(text[:, :-1], image[:, :3])
    with pytest.raises(ValueError):
        model.forward_with_cache(image[:, :1], model.new_cache(), 7)  # positions 0..6 not cached
