"""A run's whole configuration: typed, validated, printable and hashable, with named presets.

Every command builds one :class:`RunConfig` (from a preset name plus a few CLI overrides) and
passes its parts down; nothing reads global state. ``RunConfig.fingerprint()`` is what volunteers
compare so that everybody in a collaboration trains exactly the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from itertools import cycle, islice
from typing import Any, Literal

from dalle_together.errors import UserError

PAD_ID = 0
"""Text token id of padding; the text tokenizer reserves it, the model ignores it in the loss."""
BOS_ID = 1
"""Text token id that starts every caption (an empty caption is ``<bos>`` then padding)."""

AttentionLayout = Literal["full", "axial_row", "axial_col", "conv_like"]
ATTENTION_LAYOUTS: tuple[str, ...] = ("full", "axial_row", "axial_col", "conv_like")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """The built-in ``shapes`` data set."""

    image_size: int = 32
    """Side of the square images in pixels."""
    seed: int = 0
    """Seed of the training stream; worker ``w`` of a run draws from the stream ``(seed, w)``."""

    def __post_init__(self) -> None:
        if self.image_size < 32:
            # Below 32 px a small object is 3 px wide and its shape can no longer be read.
            raise UserError(f"image side must be at least 32 px, got {self.image_size}")


@dataclass(kw_only=True, frozen=True)
class VQConfig:
    """The image tokenizer: a VQ-VAE trained here, or (``kind='vqgan'``) a pretrained VQGAN."""

    kind: Literal["vqvae", "vqgan"] = "vqvae"
    """``vqvae`` is trained by ``train-vqvae``; ``vqgan`` is the seed's pretrained tokenizer."""
    image_size: int = 32
    """Side of the images it encodes; must be divisible by ``downsample``."""
    downsample: int = 4
    """Image side / code-grid side; a power of two (each halving is one strided conv)."""
    codebook_size: int = 512
    """Number of discrete codes (the transformer's image vocabulary)."""
    code_dim: int = 32
    """Dimension of each code vector."""
    hidden_channels: int = 64
    """Width of the convolutional encoder and decoder."""
    ema_decay: float = 0.9
    """Decay of the codebook's exponential moving averages."""
    commitment_weight: float = 0.25
    """Weight of the commitment loss pulling encoder outputs towards their codes."""
    dead_code_threshold: float = 1.0
    """A code whose EMA usage falls below this is restarted from a random encoder output."""
    object_weight: float = 10.0
    """Reconstruction weight of non-background pixels: objects are small, the background is not."""
    lr: float = 4e-3
    batch_size: int = 32
    """Measured on 2 cores: batch 32 at lr 4e-3 reads shape right on 100% of reconstructions
    after 3 minutes, where batch 64 at 2e-3 had not converged."""
    train_steps: int = 3000
    """Upper bound on steps; ``train_minutes`` usually stops it first."""
    train_minutes: float = 3.0

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise UserError(f"tokenizer downsampling must be a power of two, got {self.downsample}")
        if self.image_size % self.downsample:
            raise UserError(
                f"image side {self.image_size} is not divisible by the tokenizer's "
                f"downsampling factor {self.downsample}"
            )

    @property
    def grid_size(self) -> int:
        """Side of the code grid (the image is ``grid_size**2`` tokens)."""
        return self.image_size // self.downsample


@dataclass(kw_only=True, frozen=True)
class TextConfig:
    """The text tokenizer: character-level BPE (word starts marked with ▁) trained on the captions."""

    vocab_size: int = 128
    """Largest vocabulary of the BPE trainer (the trained one may be smaller on tiny corpora)."""
    text_len: int = 12
    """Tokens per caption after padding/truncation, including the leading ``<bos>``."""


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """The DALL-E-style decoder-only transformer over ``[text tokens; image tokens]``."""

    dim: int = 128
    """Width of the residual stream."""
    depth: int = 4
    """Number of layers applied (may exceed the number of unique blocks: ALBERT-style sharing)."""
    heads: int = 4
    head_dim: int = 32
    mlp_ratio: int = 4
    """Hidden width of the MLP over ``dim``."""
    text_vocab_size: int = 128
    """Rows of the text embedding: the text tokenizer's ``vocab_size`` (special tokens included)."""
    text_len: int = 12
    image_vocab_size: int = 512
    """Image codebook size."""
    image_grid: int = 8
    """Side of the image code grid; the image is ``image_grid**2`` tokens."""
    layouts: tuple[str, ...] = ("full",) * 4
    """Attention layout of each layer: full, axial_row, axial_col or conv_like."""
    block_ids: tuple[int, ...] = (0, 1, 2, 3)
    """Which unique block each layer uses; ``len(set(block_ids))`` blocks hold parameters."""
    conv_kernel: int = 5
    """Side of the causal window of ``conv_like`` layers, in image tokens."""
    position: Literal["learned", "rotary"] = "learned"
    """Learned text positions plus row+column image embeddings, or rotary (text 1D, image 2D)."""
    tie_embeddings: bool = True
    """Output logits reuse the input embeddings (text and image) as in the seed."""
    dropout: float = 0.0
    text_loss_weight: float = 1.0
    image_loss_weight: float = 7.0
    """DALL-E weighted the text and image cross-entropies 1:7."""
    caption_dropout: float = 0.1
    """Probability of training on an empty caption, which classifier-free guidance needs."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        if len(self.layouts) != self.depth or len(self.block_ids) != self.depth:
            raise UserError(
                f"model has depth {self.depth} but {len(self.layouts)} layouts and "
                f"{len(self.block_ids)} block ids"
            )
        unknown = sorted(set(self.layouts) - set(ATTENTION_LAYOUTS))
        if unknown:
            raise UserError(f"unknown attention layout(s) {unknown}; choose from {ATTENTION_LAYOUTS}")
        if sorted(set(self.block_ids)) != list(range(len(set(self.block_ids)))):
            raise UserError("block_ids must number the unique blocks 0..U-1")

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        """Length of the full ``[text; image]`` sequence."""
        return self.text_len + self.image_len

    @property
    def num_unique_blocks(self) -> int:
        return len(set(self.block_ids))


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """Optimizer and schedule; the schedule follows the global step so all peers agree on it."""

    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 100
    total_steps: int = 3000
    """Length of the cosine schedule; training may stop earlier (``--minutes``)."""
    min_lr_ratio: float = 0.1
    batch_size: int = 64
    """Samples per local step on one machine (a volunteer's ``batch_size_per_step``)."""
    target_batch_size: int = 64
    """Samples per optimizer step summed over all peers (the collaboration's global batch)."""
    eight_bit_states: bool = False
    """Keep optimizer moments in 8 bits (bitsandbytes) to fit bigger models on small GPUs."""


@dataclass(kw_only=True, frozen=True)
class SwarmConfig:
    """How volunteers average: hivemind.Optimizer settings, the seed's as defaults for ``full``."""

    matchmaking_time_s: float = 15.0
    allreduce_timeout_s: float = 60.0
    next_chunk_timeout_s: float | None = None
    """A peer that sends nothing for this long in the middle of an all-reduce (or a state download)
    is left out of the round, which ends with what the others sent. ``None``: the matchmaking time,
    hivemind's default (the seed's 15 s). A longer one tolerates slow or stalled links at the price
    of waiting that long for a peer that is gone or that dropped out of the round (measured in
    ``make demo``: 5 s instead of 0.5 s halved the volunteers' throughput)."""
    averaging_timeout_s: float = 180.0
    compression: Literal["none", "fp16", "8bit"] = "8bit"
    """Averaging compression: ``none`` is lossless; ``fp16`` everywhere; ``8bit`` quantises tensors
    above ``size_adaptive_threshold`` elements to 8 bits and sends smaller ones in fp16 (the seed's)."""
    size_adaptive_threshold: int = 65_537
    delay_optimizer_step: bool = True
    """Run each epoch's optimizer step in the background; the model gets the update a little into the
    next epoch, so the first local steps of an epoch compute gradients on parameters one step old.
    Worth it when averaging takes a good part of an epoch (slow links, the seed's); with epochs of a
    second on fast links it cost more learning per step than it saved in waiting (``make demo``,
    measured in BENCHMARKS.md)."""
    delay_grad_averaging: bool = True
    """Average gradients in the background as well (needs ``delay_optimizer_step``)."""
    offload_optimizer: bool = True
    average_state_every: int = 5
    """Average parameters and optimizer state every this many epochs (see swarm.optimizer)."""
    local_updates: bool = False
    """Each volunteer steps its own optimizer after every local batch (hivemind's
    ``use_local_updates``), and the swarm averages parameters every ``average_state_every`` epochs
    in the background, instead of averaging gradients into one step per epoch. Many small steps
    instead of one large one, and no epoch waits for a gradient round; the volunteers' parameters
    drift apart between averaging rounds. The delay options do not apply. Measured in ``make demo``
    (BENCHMARKS.md); the seed averaged gradients."""
    checkpoint_every_epochs: int = 2
    """The coordinator's auxiliary peer fetches and saves the state every K epochs."""
    keep_checkpoints: int = 3


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything that defines a training run; the unit that presets name and peers compare."""

    preset: str
    data: DataConfig = field(default_factory=DataConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)

    def __post_init__(self) -> None:
        if self.vq.image_size != self.data.image_size:
            raise UserError(
                f"data images are {self.data.image_size} px but the tokenizer expects {self.vq.image_size} px"
            )
        if self.model.image_grid != self.vq.grid_size:
            raise UserError(
                f"model expects a {self.model.image_grid}x{self.model.image_grid} code grid, "
                f"tokenizer makes {self.vq.grid_size}x{self.vq.grid_size}"
            )
        if self.model.image_vocab_size != self.vq.codebook_size:
            raise UserError("model image vocabulary must equal the tokenizer's codebook size")
        if self.model.text_len != self.text.text_len:
            raise UserError("model text length must equal the text tokenizer's text length")
        if self.model.text_vocab_size != self.text.vocab_size:
            raise UserError("model text vocabulary must equal the text tokenizer's vocabulary size")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        def build(kind: type, values: dict[str, Any]) -> Any:
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**kw)

        return cls(
            preset=d["preset"],
            data=build(DataConfig, d["data"]),
            vq=build(VQConfig, d["vq"]),
            text=build(TextConfig, d["text"]),
            model=build(ModelConfig, d["model"]),
            optim=build(OptimConfig, d["optim"]),
            swarm=build(SwarmConfig, d["swarm"]),
        )

    def fingerprint(self) -> str:
        """A short hash of the parts that must agree between peers (model, data, tokenizers)."""
        must_agree = {k: v for k, v in self.to_dict().items() if k in ("data", "vq", "text", "model")}
        blob = json.dumps(must_agree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections replaced, re-validated (``cfg.replace(model=...)``)."""
        return dataclasses.replace(self, **sections)


def with_image_size(cfg: RunConfig, image_size: int) -> RunConfig:
    """The same run at another image side; the code grid follows the tokenizer's downsampling."""
    vq = dataclasses.replace(cfg.vq, image_size=image_size)  # validates divisibility
    model = dataclasses.replace(cfg.model, image_grid=vq.grid_size)
    model = dataclasses.replace(model)  # re-run validation
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, image_size=image_size), vq=vq, model=model
    )


def _tiny() -> RunConfig:
    text = TextConfig(vocab_size=128, text_len=12)
    return RunConfig(
        preset="tiny",
        text=text,
        model=ModelConfig(
            dim=128,
            depth=4,
            heads=4,
            head_dim=32,
            text_vocab_size=text.vocab_size,
            text_len=text.text_len,
            layouts=("full",) * 4,
            block_ids=(0, 1, 2, 3),
        ),
        optim=OptimConfig(lr=1e-3, batch_size=64, target_batch_size=64, total_steps=3000, warmup_steps=100),
        swarm=SwarmConfig(
            matchmaking_time_s=2.0,
            allreduce_timeout_s=15.0,
            averaging_timeout_s=30.0,
            compression="fp16",
            checkpoint_every_epochs=5,
        ),
    )


def _small() -> RunConfig:
    """A 64 px, 16-layer model with the seed's layout pattern and sharing, for a real GPU."""
    depth = 16
    text = TextConfig(vocab_size=256, text_len=16)
    return RunConfig(
        preset="small",
        data=DataConfig(image_size=64),
        vq=VQConfig(image_size=64, downsample=4, codebook_size=1024, hidden_channels=96),
        text=text,
        model=ModelConfig(
            dim=384,
            depth=depth,
            heads=6,
            head_dim=64,
            text_vocab_size=text.vocab_size,
            text_len=text.text_len,
            image_vocab_size=1024,
            image_grid=16,
            layouts=seed_layouts(depth),
            block_ids=seed_block_ids(depth),
            conv_kernel=7,
        ),
        optim=OptimConfig(
            optimizer="lamb",
            lr=2e-3,
            betas=(0.9, 0.96),
            eps=1e-6,
            weight_decay=0.045,
            grad_clip=4.0,
            warmup_steps=500,
            total_steps=10_000,
            batch_size=32,
            target_batch_size=512,
        ),
    )


def seed_layouts(depth: int) -> tuple[str, ...]:
    """The seed's attention pattern: (row, col, row, row) repeated, and a conv-like last layer."""
    return (*islice(cycle(("axial_row", "axial_col", "axial_row", "axial_row")), depth - 1), "conv_like")


def seed_block_ids(depth: int) -> tuple[int, ...]:
    """The seed's sharing: the first ``depth-1`` layers cycle over 4 blocks, the last has its own."""
    return (*islice(cycle(range(4)), depth - 1), 4)


def _full() -> RunConfig:
    """The seed's configuration (Training Transformers Together, NeurIPS 2021 demo)."""
    depth = 64
    text = TextConfig(vocab_size=32_100, text_len=256)
    return RunConfig(
        preset="full",
        data=DataConfig(image_size=256),
        vq=VQConfig(
            kind="vqgan", image_size=256, downsample=8, codebook_size=8192, code_dim=256, hidden_channels=128
        ),
        text=text,
        model=ModelConfig(
            dim=1024,
            depth=depth,
            heads=16,
            head_dim=64,
            text_vocab_size=32_100,
            text_len=text.text_len,
            image_vocab_size=8192,
            image_grid=32,
            layouts=seed_layouts(depth),
            block_ids=seed_block_ids(depth),
            conv_kernel=11,
            position="rotary",
            tie_embeddings=True,
            gradient_checkpointing=True,
        ),
        optim=OptimConfig(
            optimizer="lamb",
            lr=0.0025,
            betas=(0.9, 0.96),
            eps=1e-6,
            weight_decay=0.045,
            grad_clip=4.0,
            warmup_steps=3125,
            total_steps=31_250,
            batch_size=4,
            target_batch_size=4096,
            eight_bit_states=False,
        ),
        # The seed's final run delayed the optimizer step but not gradient averaging.
        swarm=SwarmConfig(delay_grad_averaging=False),
    )


PRESETS = {"tiny": _tiny, "small": _small, "full": _full}


def preset(name: str) -> RunConfig:
    """The named preset; an unknown name is a :class:`UserError` listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
