"""The command line as a user meets it: real subprocesses, exit codes, files written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_fixtures import trained_run  # noqa: F401

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dalle_together.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert words in lines[0], lines[0]


def test_help_reads_well():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "train-vqvae", "generate", "evaluate"):
        assert command in result.stdout


def test_generate_writes_valid_pngs_and_prints_their_paths(trained_run, tmp_path):
    out = tmp_path / "images"
    result = cli(
        "generate",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(out),
        "--num-images",
        "2",
        "--seed",
        "3",
        "a small red circle in the center",
        "a large blue square in the top left",
    )
    assert result.returncode == 0, result.stderr
    paths = [Path(p) for p in result.stdout.split()]
    assert len(paths) == 2 * 2 + 1 and paths[-1].name == "grid.png"
    for p in paths:
        with Image.open(p) as img:
            img.verify()
    with Image.open(paths[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_same_seed_same_images(trained_run, tmp_path):
    runs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        result = cli(
            "generate",
            "--checkpoint",
            str(trained_run),
            "--out",
            str(tmp_path / name),
            "--num-images",
            "3",
            "--seed",
            seed,
            "a large green triangle in the bottom right",
        )
        assert result.returncode == 0, result.stderr
        runs.append([np.asarray(Image.open(p)) for p in result.stdout.split()[:-1]])
    assert all(np.array_equal(x, y) for x, y in zip(runs[0], runs[1], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(runs[0], runs[2], strict=True))


def test_long_prompt_is_truncated_with_a_warning(trained_run, tmp_path):
    prompt = "a large green triangle in the bottom right " * 4
    result = cli(
        "generate", "--checkpoint", str(trained_run), "--out", str(tmp_path), "--num-images", "1", prompt
    )
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_prints_accuracy_as_json(trained_run):
    result = cli("evaluate", "--checkpoint", str(trained_run), "--num-captions", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for split in ("seen", "holdout"):
        assert report[split]["n"] == 8
        assert set(report[split]) >= {"color", "shape", "position", "size"}
        assert all(0.0 <= report[split][a] <= 1.0 for a in ("color", "shape", "position", "size"))
    assert report["vqvae_psnr_db"] > 5


# --- bad input: one line, non-zero exit, never a traceback -----------------------------------


def test_missing_checkpoint(tmp_path):
    assert_user_error(
        cli("generate", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path), "a red circle"),
        "does not exist",
    )
    assert_user_error(cli("evaluate", "--checkpoint", str(tmp_path)), "no checkpoint")


def test_corrupt_checkpoint(trained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "checkpoints" / "step-00000030", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(
        cli("generate", "--checkpoint", str(broken), "--out", str(tmp_path / "o"), "a red circle"), "corrupt"
    )
    shutil.copy(trained_run / "checkpoints" / "step-00000030" / "model.safetensors", broken)
    (broken / "run.json").write_text("{ truncated")
    assert_user_error(cli("evaluate", "--checkpoint", str(broken)), "corrupt")
    (broken / "run.json").write_text((trained_run / "run.json").read_text())
    (broken / "vqvae.safetensors").write_bytes(b"\x00" * 10)
    assert_user_error(cli("evaluate", "--checkpoint", str(broken)), "")


def test_unknown_preset(tmp_path):
    assert_user_error(
        cli("train", "--preset", "huge", "--out", str(tmp_path), "--steps", "1"), "unknown preset"
    )


def test_image_side_not_divisible_by_downsampling(tmp_path):
    assert_user_error(
        cli("train", "--preset", "tiny", "--image-size", "34", "--out", str(tmp_path), "--steps", "1"),
        "not divisible",
    )


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(trained_run, tmp_path, prompt):
    assert_user_error(
        cli("generate", "--checkpoint", str(trained_run), "--out", str(tmp_path), prompt), "empty prompt"
    )


def test_cuda_when_absent_is_a_clear_error(trained_run, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(
        cli(
            "generate",
            "--checkpoint",
            str(trained_run),
            "--out",
            str(tmp_path),
            "--device",
            "cuda",
            "a red circle",
        ),
        "CUDA",
    )
