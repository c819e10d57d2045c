import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from run_fixtures import TEST_STEPS, quick_tiny, trained_run, with_tokenizers_of  # noqa: F401

from dalle_together.checkpoint import read_latest, save_checkpoint
from dalle_together.errors import UserError
from dalle_together.inference import load_bundle
from dalle_together.optim import Lamb, build_optimizer, lr_multiplier
from dalle_together.train import build_model, token_batches, train


def test_train_writes_a_complete_checkpoint(trained_run):
    latest = read_latest(trained_run)
    assert latest is not None and latest.name == f"step-{TEST_STEPS:08d}"
    names = {p.name for p in latest.iterdir()}
    assert {
        "model.safetensors",
        "optimizer.pt",
        "state.json",
        "run.json",
        "text_tokenizer.json",
        "vqvae.safetensors",
        "vqvae.json",
    } <= names
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == TEST_STEPS
    assert not list((trained_run / "checkpoints").glob(".step-*")), "temporary directories left behind"


def test_checkpoint_round_trip_gives_identical_logits(trained_run, tmp_path):
    bundle = load_bundle(trained_run)
    text, image = next(token_batches(bundle.cfg, bundle.text_tokenizer, bundle.vqvae, batch_size=4))
    with torch.no_grad():
        before = bundle.model(text, image[:, :-1])
    # Save the loaded model as a new checkpoint, reload it, and compare the logits bit for bit.
    save_checkpoint(trained_run, cfg_dict=bundle.cfg.to_dict(), model=bundle.model, state={"step": 999})
    again = load_bundle(trained_run / "checkpoints" / "step-00000999")
    with torch.no_grad():
        after = again.model(text, image[:, :-1])
    assert torch.equal(before.text, after.text) and torch.equal(before.image, after.image)


def test_resume_continues_from_the_last_step(trained_run, tmp_path):
    cfg = quick_tiny()
    with_tokenizers_of(trained_run, tmp_path)
    first = train(cfg, tmp_path, steps=5, checkpoint_every_s=1e9)
    assert first.state.step == 5
    second = train(cfg, tmp_path, steps=8, checkpoint_every_s=1e9)
    assert second.state.step == 8
    assert second.state.samples_seen == 8 * cfg.optim.batch_size
    # The tokenizers were reused, not retrained: the same files are referenced by both steps.
    a = tmp_path / "checkpoints" / "step-00000005" / "vqvae.safetensors"
    b = tmp_path / "checkpoints" / "step-00000008" / "vqvae.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_interrupted_save_leaves_previous_checkpoint_usable(trained_run, monkeypatch):
    bundle = load_bundle(trained_run)
    before = read_latest(trained_run)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        save_checkpoint(
            trained_run,
            cfg_dict=bundle.cfg.to_dict(),
            model=bundle.model,
            state={"step": 12345},
            optimizer_state={"x": 1},
        )
    assert read_latest(trained_run) == before
    assert not (trained_run / "checkpoints" / "step-00012345").exists()
    assert not list((trained_run / "checkpoints").glob(".step-*"))


def test_loss_goes_down_on_shapes(trained_run, tmp_path):
    cfg = quick_tiny()
    cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, batch_size=16, warmup_steps=10, total_steps=100))
    with_tokenizers_of(trained_run, tmp_path)
    losses: list[float] = []
    train(cfg, tmp_path, steps=100, checkpoint_every_s=1e9, on_progress=lambda s, m: losses.append(m["loss"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)


def test_train_needs_a_limit(tmp_path):
    with pytest.raises(UserError):
        train(quick_tiny(), tmp_path)


def test_token_batches_are_valid_and_workers_differ(trained_run):
    bundle = load_bundle(trained_run)
    cfg = bundle.cfg
    t0, i0 = next(token_batches(cfg, bundle.text_tokenizer, bundle.vqvae, batch_size=8, worker=0))
    t1, i1 = next(token_batches(cfg, bundle.text_tokenizer, bundle.vqvae, batch_size=8, worker=1))
    assert t0.shape == (8, cfg.model.text_len) and i0.shape == (8, cfg.model.image_len)
    assert int(i0.max()) < cfg.model.image_vocab_size and int(t0.max()) < cfg.model.text_vocab_size
    assert (t0[:, 0] == 1).all()  # every caption starts with <bos>
    assert not torch.equal(i0, i1)


def test_lr_schedule_warms_up_then_decays():
    cfg = quick_tiny().optim
    cfg = dataclasses.replace(cfg, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, cfg) for s in range(150)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert np.all(np.diff(lrs[10:100]) <= 1e-12)
    assert lrs[120] == pytest.approx(0.1)


def test_lamb_clips_inside_step_and_learns():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = Lamb([w], lr=0.05, max_grad_norm=1.0)
    target = torch.zeros(8, 8)
    start = (w - target).pow(2).sum().item()
    for _ in range(50):
        opt.zero_grad()
        ((w - target).pow(2).sum() * 1000).backward()  # huge gradients: clipping must tame them
        opt.step()
        assert w.grad.norm() <= 1.0 + 1e-5
    assert (w - target).pow(2).sum().item() < start


def test_build_optimizer_respects_config():
    model = build_model(quick_tiny())
    cfg = dataclasses.replace(quick_tiny().optim, optimizer="lamb", lr=0.01)
    opt = build_optimizer(model.param_groups(cfg.weight_decay), cfg)
    assert isinstance(opt, Lamb)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.weight_decay}


def test_no_half_written_files_after_save(trained_run):
    leftovers = [p for p in trained_run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert os.stat(trained_run / "latest").st_mode & 0o044  # readable by others, unlike mkstemp's 0600
