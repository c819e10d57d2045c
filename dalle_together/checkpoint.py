"""Atomic file writes, and saving/loading training checkpoints (safetensors weights + JSON).

A checkpoint directory is never half-written: every file goes to a temporary name in the same
directory and is renamed into place, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from dalle_together.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    :param mode: the file's permissions, set before anything is written (``0o600`` for a secret);
      default ``0o644``, set once written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        if mode is not None:
            os.chmod(tmp_path, mode)
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644 if mode is None else mode)  # mkstemp makes 0600; checkpoints are shared
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- training checkpoints -------------------------------------------------------------------
#
# A run directory holds the run's definition and its tokenizers at the top, and one directory
# per saved step under checkpoints/, each complete on its own (tokenizer files are hard links),
# so a checkpoint directory can be copied anywhere and `generate` still works:
#
#   RUN/run.json  RUN/text_tokenizer.json  RUN/vqvae.safetensors  RUN/vqvae.json
#   RUN/checkpoints/step-00001200/{model.safetensors, optimizer.pt, state.json, run.json, ...}
#   RUN/latest                      -> the name of the newest complete step directory
#
# A step directory is written under a temporary name and renamed into place; `latest` is
# rewritten atomically afterwards, so a crash at any point leaves the previous checkpoint usable.

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
TOKENIZER_FILES = ("text_tokenizer.json", "vqvae.safetensors", "vqvae.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    cfg_dict: dict[str, Any],
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write a complete checkpoint for ``state['step']`` and point ``RUN/latest`` at it."""
    run_dir = Path(run_dir)
    step = int(state["step"])
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpt_root))
    try:
        os.chmod(tmp, 0o755)
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        (tmp / RUN_FILE).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (run_dir / name).exists():
                _link_or_copy(run_dir / name, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(run_dir / LATEST_FILE) as t:
        t.write_text(final.name + "\n")
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` step directories (never the one ``latest`` names)."""
    root = Path(run_dir) / "checkpoints"
    latest = read_latest(run_dir)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(len(steps) - keep, 0)]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # temporary directories of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)


def read_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    target = Path(run_dir) / "checkpoints" / pointer.read_text().strip()
    return target if (target / MODEL_FILE).is_file() else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A run directory (its latest checkpoint) or a step directory -> the step directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / MODEL_FILE).is_file():
        return path
    latest = read_latest(path)
    if latest is None:
        raise UserError(f"no checkpoint in {path} (expected {LATEST_FILE} or {MODEL_FILE}); train first")
    return latest


def load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{what} is corrupt (not valid JSON): {path}") from None


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model`` strictly; a bad file is a :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"model weights are missing: {path}")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise UserError(f"model weights are corrupt or incompatible: {path} ({type(e).__name__})") from None
    if missing or unexpected:
        raise UserError(
            f"model weights in {path} do not match the model (missing {len(missing)}, "
            f"unexpected {len(unexpected)} tensors)"
        )
