"""The DALL-E-style decoder-only transformer over one sequence ``[text tokens; image tokens]``.

Read top to bottom in the order the data flows: attention masks and rotary positions, the KV cache,
attention, MLP, block, then :class:`DalleTransformer` (embeddings, layers, logits, loss, optimizer
parameter groups). Sampling lives in :mod:`dalle_together.sampling`; nothing here knows about data,
tokenizers, training or the network.

The sequence is ``text_len`` text tokens (``text[:, 0]`` is ``<bos>``) followed by ``image_grid**2``
image codes in raster order, ``T = seq_len`` tokens in all. Text and image ids live in different
vocabularies and are told apart by position. The logits at position ``p`` predict token ``p + 1``:
positions ``0 .. text_len-2`` predict text, positions ``text_len-1 .. T-2`` predict image codes.

Shape letters: ``B`` batch, ``T`` tokens in this call, ``S`` tokens attended to (``T`` without a
cache, ``start_pos + T`` with one), ``C`` = ``dim``, ``nh`` heads, ``hs`` = ``head_dim``,
``Vt``/``Vi`` text/image vocabulary sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle_together.config import BOS_ID, PAD_ID, ModelConfig
from dalle_together.errors import UserError

# --------------------------------------------------------------------------------------------------
# Attention layouts


def build_attention_mask(layout: str, text_len: int, grid: int, conv_kernel: int) -> Tensor:
    """Boolean ``(T, T)`` mask of layout ``layout``; ``mask[q, k]`` is True where query ``q`` sees key ``k``.

    ``T = text_len + grid**2``. Text tokens attend causally to text only. Image tokens attend to all
    text tokens and, causally in raster order (a token sees itself), to the image tokens that the
    layout allows:

    - ``full``: every earlier image token;
    - ``axial_row``: earlier tokens of its own row;
    - ``axial_col``: earlier tokens of its own column;
    - ``conv_like``: earlier tokens within the ``conv_kernel x conv_kernel`` window centred on it
      (half-width ``conv_kernel // 2``, so an even kernel acts as the next odd one).
    """
    size = text_len + grid * grid
    pos = torch.arange(size)
    q, k = pos[:, None], pos[None, :]  # (T, 1), (1, T)
    causal = k <= q  # (T, T)
    q_text, k_text = q < text_len, k < text_len
    q_img, k_img = (q - text_len).clamp(min=0), (k - text_len).clamp(min=0)  # image index, 0 for text
    q_row, q_col = q_img // grid, q_img % grid
    k_row, k_col = k_img // grid, k_img % grid
    if layout == "full":
        image_ok = torch.ones_like(causal)
    elif layout == "axial_row":
        image_ok = q_row == k_row
    elif layout == "axial_col":
        image_ok = q_col == k_col
    elif layout == "conv_like":
        half = conv_kernel // 2
        image_ok = ((q_row - k_row).abs() <= half) & ((q_col - k_col).abs() <= half)
    else:
        raise UserError(f"unknown attention layout {layout!r}")
    image_query_sees = k_text | (image_ok & causal)  # all text, allowed earlier image tokens
    return causal & torch.where(q_text, k_text, image_query_sees)  # (T, T)


# --------------------------------------------------------------------------------------------------
# Rotary positions: text tokens rotate by their 1D position, image tokens by their 2D (row, col)

ROTARY_THETA_SEQUENCE = 10_000.0
"""Base of the frequencies of the sequence axis (positions up to ``text_len``)."""
ROTARY_THETA_GRID = 100.0
"""Base of the row and column axes: grids are short (up to 32), so lower frequencies would idle."""


def rotary_positions(text_len: int, grid: int) -> Tensor:
    """Long ``(T, 3)`` rotary coordinates ``(sequence, row, col)`` of every token of the sequence.

    Text token ``t`` sits at ``(t, 0, 0)``; the image token in row ``r``, column ``c`` sits at
    ``(text_len, r, c)``: one step after the last text token on the sequence axis, and placed on the
    grid by the row and column axes. Relative offsets then say "how far back in the caption" between
    text tokens and "how many rows/columns apart" between image tokens.
    """
    t = torch.arange(text_len)
    text = torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], 1)  # (text_len, 3)
    img = torch.arange(grid * grid)
    image = torch.stack([torch.full_like(img, text_len), img // grid, img % grid], 1)  # (grid**2, 3)
    return torch.cat([text, image], 0)  # (T, 3)


def rotary_pairs_per_axis(head_dim: int) -> int:
    """Rotated pairs of dimensions per axis: ``head_dim // 6`` (three axes of two dims per pair).

    The first ``6 * (head_dim // 6)`` dims of each head are rotated, the rest pass through unrotated
    (``head_dim=64``: 10 pairs per axis, 60 dims rotated, 4 unrotated).
    """
    return head_dim // 6


def rotary_angles(positions: Tensor, head_dim: int) -> Tensor:
    """Float32 ``(T, P)`` rotation angles of the ``P = 3 * head_dim // 6`` rotated pairs.

    :param positions: long ``(T, 3)`` coordinates from :func:`rotary_positions`
    """
    pairs = rotary_pairs_per_axis(head_dim)
    exponents = torch.arange(pairs, device=positions.device, dtype=torch.float32) / pairs  # (P/3,)
    angles = []
    for axis, theta in enumerate((ROTARY_THETA_SEQUENCE, ROTARY_THETA_GRID, ROTARY_THETA_GRID)):
        inv_freq = theta**-exponents  # (P/3,)
        angles.append(positions[:, axis, None].float() * inv_freq)  # (T, P/3)
    return torch.cat(angles, -1)  # (T, P)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``2P`` dims of ``x`` (B, nh, T, hs) by ``angles`` (T, P), rotate-half style.

    Dim ``j`` pairs with dim ``P + j``; dims from ``2P`` on pass through. Computed in float32.
    """
    pairs = angles.shape[-1]
    cos, sin = angles.cos(), angles.sin()  # (T, P), broadcast over (B, nh)
    x1, x2 = x[..., :pairs].float(), x[..., pairs : 2 * pairs].float()  # (B, nh, T, P) each
    rest = x[..., 2 * pairs :]  # (B, nh, T, hs - 2P)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)  # (B, nh, T, 2P)
    return torch.cat([rotated, rest], -1)  # (B, nh, T, hs)


# --------------------------------------------------------------------------------------------------
# KV cache for incremental decoding


@dataclass
class KVCache:
    """Keys and values of every LAYER for positions ``[0, length)`` of a batch being decoded.

    One entry per layer, not per unique block: layers that share a block see different inputs, so
    their keys and values differ. Tensors are allocated on the first write of each layer, with the
    dtype and device of the keys (so autocast works), and sized for the whole sequence. Keys are
    stored after the rotary rotation.
    """

    max_len: int
    """Positions the cache can hold: the model's ``seq_len``."""
    keys: list[Tensor | None]
    """Per layer: ``(B, nh, max_len, hs)``, valid up to ``length``; None before the first write."""
    values: list[Tensor | None]
    length: int = 0
    """Positions filled so far; the next call to ``forward_with_cache`` starts here (or earlier)."""

    @classmethod
    def empty(cls, depth: int, max_len: int) -> KVCache:
        return cls(max_len=max_len, keys=[None] * depth, values=[None] * depth)

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` (B, nh, T, hs) at ``[start_pos, start_pos + T)``; return keys/values (B, nh, S, hs)."""
        end = start_pos + k.shape[2]
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])  # (B, nh, max_len, hs)
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        keys[:, :, start_pos:end] = k
        values[:, :, start_pos:end] = v
        return keys[:, :, :end], values[:, :, :end]  # (B, nh, S, hs)


# --------------------------------------------------------------------------------------------------
# The transformer block


class Attention(nn.Module):
    """Multi-head self-attention under a boolean mask, with optional rotary positions and KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.dim)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        angles: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> Tensor:
        B, T, C = x.shape  # (B, T, C)
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)  # (B, nh, S, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)  # (B, T, nh*hs)
        return self.resid_drop(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the layout (mask) is chosen per layer by the caller."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        angles: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), mask, angles, cache, layer, start_pos)  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


# --------------------------------------------------------------------------------------------------
# The model


class Logits(NamedTuple):
    """Next-token logits of one call, split by the vocabulary they predict."""

    text: Tensor
    """``(B, Tt, Vt)``: from the positions that predict text tokens (``p < text_len - 1``)."""
    image: Tensor
    """``(B, Ti, Vi)``: from the positions that predict image tokens (``p >= text_len - 1``)."""


def empty_captions(batch_size: int, text_len: int, device: torch.device | str | None = None) -> Tensor:
    """``(batch_size, text_len)`` empty captions ``[<bos>, <pad>, <pad>, ...]`` (the unconditional input)."""
    captions = torch.full((batch_size, text_len), PAD_ID, dtype=torch.long, device=device)
    captions[:, 0] = BOS_ID
    return captions


class DalleTransformer(nn.Module):
    """DALL-E-style transformer: text and image tokens, per-layer attention layouts, shared blocks.

    ``cfg.depth`` layers run; layer ``i`` applies unique block ``cfg.block_ids[i]`` under layout
    ``cfg.layouts[i]``. Only the ``cfg.num_unique_blocks`` blocks hold parameters (ALBERT-style).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if (
            cfg.text_loss_weight < 0
            or cfg.image_loss_weight < 0
            or cfg.text_loss_weight + cfg.image_loss_weight <= 0
        ):
            raise UserError("text and image loss weights must be non-negative and not both zero")
        if not 0.0 <= cfg.caption_dropout <= 1.0:
            raise UserError(f"caption dropout must be a probability, got {cfg.caption_dropout}")
        if cfg.position == "rotary" and rotary_pairs_per_axis(cfg.head_dim) == 0:
            raise UserError(f"rotary positions need head_dim >= 6 (three 2D axes), got {cfg.head_dim}")
        self.cfg = cfg

        self.text_emb = nn.Embedding(cfg.text_vocab_size, cfg.dim)
        self.image_emb = nn.Embedding(cfg.image_vocab_size, cfg.dim)
        if cfg.position == "learned":
            self.text_pos = nn.Parameter(torch.empty(cfg.text_len, cfg.dim))  # (text_len, C)
            self.image_row = nn.Parameter(torch.empty(cfg.image_grid, cfg.dim))  # (grid, C)
            self.image_col = nn.Parameter(torch.empty(cfg.image_grid, cfg.dim))  # (grid, C)
        else:
            coords = rotary_positions(cfg.text_len, cfg.image_grid)  # (T, 3) long (not cast by .to(dtype))
            self.register_buffer("rotary_coords", coords, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_unique_blocks))
        for layout in dict.fromkeys(cfg.layouts):  # one mask per distinct layout, shared by layers
            mask = build_attention_mask(layout, cfg.text_len, cfg.image_grid, cfg.conv_kernel)  # (T, T)
            self.register_buffer(f"mask_{layout}", mask, persistent=False)
        self.ln_f = nn.LayerNorm(cfg.dim)
        if not cfg.tie_embeddings:
            self.text_head = nn.Linear(cfg.dim, cfg.text_vocab_size, bias=False)
            self.image_head = nn.Linear(cfg.dim, cfg.image_vocab_size, bias=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):  # residual outputs, GPT-2 style
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.depth))
        if cfg.position == "learned":
            for p in (self.text_pos, self.image_row, self.image_col):
                nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- structure -------------------------------------------------------------------------------

    def block_for_layer(self, layer: int) -> Block:
        """The unique block that layer ``layer`` runs."""
        return self.blocks[self.cfg.block_ids[layer]]

    def mask_for_layer(self, layer: int) -> Tensor:
        """The full-length ``(T, T)`` mask of layer ``layer`` (a buffer shared by its layout)."""
        return getattr(self, f"mask_{self.cfg.layouts[layer]}")

    def num_parameters(self) -> int:
        """Number of unique parameters (a shared block and tied embeddings count once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        """An empty KV cache for :meth:`forward_with_cache` (sized for the whole sequence)."""
        return KVCache.empty(self.cfg.depth, self.cfg.seq_len)

    # ---- forward ---------------------------------------------------------------------------------

    def _embed(self, tokens: Tensor, start_pos: int) -> Tensor:
        """Embed ``tokens`` (B, T) sitting at positions ``[start_pos, start_pos + T)`` -> (B, T, C)."""
        cfg = self.cfg
        n_text = min(max(cfg.text_len - start_pos, 0), tokens.shape[1])  # leading tokens that are text
        text, image = tokens[:, :n_text], tokens[:, n_text:]  # (B, Tt), (B, Ti)
        x_text = self.text_emb(text)  # (B, Tt, C)
        x_image = self.image_emb(image)  # (B, Ti, C)
        if cfg.position == "learned":
            text_idx = torch.arange(start_pos, start_pos + n_text, device=tokens.device)  # (Tt,)
            first_image = max(start_pos - cfg.text_len, 0)
            image_idx = torch.arange(first_image, first_image + image.shape[1], device=tokens.device)  # (Ti,)
            x_text = x_text + self.text_pos[text_idx]  # (B, Tt, C)
            x_image = (
                x_image
                + self.image_row[image_idx // cfg.image_grid]
                + self.image_col[image_idx % cfg.image_grid]
            )
        return self.drop(torch.cat([x_text, x_image], 1))  # (B, T, C)

    def _layers(self, x: Tensor, start_pos: int, cache: KVCache | None) -> Tensor:
        """Run all ``depth`` layers on ``x`` (B, T, C) at positions ``[start_pos, start_pos + T)``."""
        end = start_pos + x.shape[1]
        angles = None
        if self.cfg.position == "rotary":
            angles = rotary_angles(self.rotary_coords[start_pos:end], self.cfg.head_dim)  # (T, P)
        checkpointing = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in range(self.cfg.depth):
            block = self.block_for_layer(layer)
            mask = self.mask_for_layer(layer)[start_pos:end, :end]  # (T, S): these queries, all keys so far
            if checkpointing and cache is None:
                x = checkpoint(block, x, mask, angles, use_reentrant=False)
            else:
                x = block(x, mask, angles, cache, layer, start_pos)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def _logits(self, h: Tensor, start_pos: int) -> Logits:
        """Split ``h`` (B, T, C) at the first position that predicts an image token; project each part."""
        n_text = min(max(self.cfg.text_len - 1 - start_pos, 0), h.shape[1])
        h_text, h_image = h[:, :n_text], h[:, n_text:]  # (B, Tt, C), (B, Ti, C)
        if self.cfg.tie_embeddings:
            text_logits = h_text @ self.text_emb.weight.T  # (B, Tt, Vt)
            image_logits = h_image @ self.image_emb.weight.T  # (B, Ti, Vi)
        else:
            text_logits, image_logits = self.text_head(h_text), self.image_head(h_image)
        return Logits(text=text_logits, image=image_logits)

    def forward(self, text: Tensor, image: Tensor) -> Logits:
        """Logits of the sequence ``[text; image]`` from scratch (no cache).

        :param text: ``(B, text_len)`` caption token ids, ``text[:, 0]`` is ``<bos>``
        :param image: ``(B, k)`` the first ``k < image_len`` image codes (training passes
            ``image[:, :-1]``; sampling without a cache passes the codes drawn so far)
        :returns: ``Logits(text=(B, text_len-1, Vt), image=(B, k+1, Vi))``: ``text`` predicts
            ``text[:, 1:]`` and ``image`` predicts image codes ``0 .. k``
        """
        cfg = self.cfg
        if text.shape[1] != cfg.text_len:
            raise ValueError(f"expected {cfg.text_len} text tokens, got {text.shape[1]}")
        if image.shape[1] >= cfg.image_len:
            raise ValueError(
                f"expected fewer than {cfg.image_len} image tokens (the last one predicts nothing)"
            )
        tokens = torch.cat([text, image], 1)  # (B, T) ids of two vocabularies, told apart by position
        return self._logits(self._layers(self._embed(tokens, 0), 0, None), 0)

    def forward_with_cache(self, tokens: Tensor, cache: KVCache, start_pos: int) -> Logits:
        """Incremental decoding: run ``tokens`` (B, T) at positions ``[start_pos, start_pos + T)``.

        Earlier positions come from ``cache`` (filled by previous calls); this call's keys and values
        are written into it and ``cache.length`` becomes ``start_pos + T``. Tokens at positions below
        ``text_len`` are text ids, the others image ids. Returns the logits of these positions, split
        as in :meth:`forward` (e.g. prefilling the caption gives ``image`` of shape (B, 1, Vi)).
        """
        end = start_pos + tokens.shape[1]
        if start_pos > cache.length:
            raise ValueError(f"cache holds {cache.length} positions, cannot continue at {start_pos}")
        if end >= self.cfg.seq_len:
            raise ValueError(f"positions up to {end - 1} given; the last position predicts nothing")
        h = self._layers(self._embed(tokens, start_pos), start_pos, cache)  # (B, T, C)
        cache.length = end
        return self._logits(h, start_pos)

    # ---- training --------------------------------------------------------------------------------

    def drop_captions(self, text: Tensor) -> Tensor:
        """In training mode, replace each caption of ``text`` (B, text_len) by the empty caption
        with probability ``cfg.caption_dropout`` (classifier-free guidance needs the unconditional
        model); in eval mode return ``text`` unchanged."""
        if not self.training or self.cfg.caption_dropout <= 0:
            return text
        drop = torch.rand(text.shape[0], device=text.device) < self.cfg.caption_dropout  # (B,)
        empty = empty_captions(text.shape[0], text.shape[1], text.device)  # (B, text_len)
        return torch.where(drop[:, None], empty, text)

    def loss(self, text: Tensor, image: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Weighted text and image cross-entropy of a batch of ``(text, image)`` pairs.

        :param text: ``(B, text_len)`` captions; targets equal to ``PAD_ID`` are ignored
        :param image: ``(B, image_len)`` image codes
        :returns: the scalar loss ``(w_t * L_t + w_i * L_i) / (w_t + w_i)`` to backpropagate, and
            float metrics ``{"loss", "text_loss", "image_loss"}``
        """
        cfg = self.cfg
        text = self.drop_captions(text)
        logits = self(text, image[:, :-1])  # text (B, text_len-1, Vt), image (B, image_len, Vi)
        text_targets = text[:, 1:].reshape(-1)  # (B*(text_len-1),)
        text_sum = F.cross_entropy(
            logits.text.reshape(-1, cfg.text_vocab_size).float(),
            text_targets,
            ignore_index=PAD_ID,
            reduction="sum",
        )
        text_loss = text_sum / (text_targets != PAD_ID).sum().clamp(min=1)  # 0 if every target is padding
        image_loss = F.cross_entropy(
            logits.image.reshape(-1, cfg.image_vocab_size).float(), image.reshape(-1)
        )
        w_t, w_i = cfg.text_loss_weight, cfg.image_loss_weight
        loss = (w_t * text_loss + w_i * image_loss) / (w_t + w_i)
        values = torch.stack([loss, text_loss, image_loss]).detach().tolist()  # one device sync for all three
        metrics = dict(zip(("loss", "text_loss", "image_loss"), values, strict=True))
        return loss, metrics

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups, nanoGPT style: weight decay on matrices (linear weights) only;
        none on biases, LayerNorms, embeddings and position tables."""
        embeddings = {id(self.text_emb.weight), id(self.image_emb.weight)}
        if self.cfg.position == "learned":
            embeddings |= {id(self.text_pos), id(self.image_row), id(self.image_col)}
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
