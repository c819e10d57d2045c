"""A tiny trained run shared by the tests that need a real checkpoint (train, CLI, evaluate).

Training it takes seconds; it is built once per pytest session in the session's temp dir and
reused by every module that imports ``trained_run``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from dalle_together.config import RunConfig, preset
from dalle_together.train import train

TEST_STEPS = 30


def quick_tiny() -> RunConfig:
    """The tiny preset with a VQ-VAE trained for a handful of steps: fast, not good."""
    cfg = preset("tiny")
    return cfg.replace(
        vq=dataclasses.replace(cfg.vq, train_steps=40, train_minutes=1.0),
        optim=dataclasses.replace(cfg.optim, batch_size=16, warmup_steps=5),
    )


def with_tokenizers_of(run_dir: Path, dest: Path) -> Path:
    """A new run directory that reuses ``run_dir``'s trained tokenizers (skips their training)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("text_tokenizer.json", "vqvae.safetensors", "vqvae.json"):
        shutil.copy(run_dir / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.getbasetemp() / "tiny-run"
    if not (run_dir / "latest").exists():
        torch.set_num_threads(2)
        train(quick_tiny(), run_dir, steps=TEST_STEPS, checkpoint_every_s=1e9)
    return run_dir
