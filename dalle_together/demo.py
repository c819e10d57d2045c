"""``make demo``: train the tiny model briefly on ``shapes`` and draw a grid of fixed prompts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEMO_PROMPTS = [
    "a large red circle in the center",
    "a small blue triangle in the top left",
    "a large yellow square in the bottom right",
    "a small cyan circle in the top right",
    "a large magenta triangle in the bottom left",
    "a small orange square in the center",
]


def run(*args: str) -> str:
    cmd = [sys.executable, "-m", "dalle_together.cli", *args]
    print("$ dalle-together " + " ".join(args), flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(result.returncode)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--minutes", type=float, default=4.0)
    args = parser.parse_args()
    run("train", "--preset", "tiny", "--out", str(args.out), "--minutes", str(args.minutes))
    paths = run(
        "generate",
        "--checkpoint",
        str(args.out),
        "--out",
        str(args.out / "samples"),
        "--num-images",
        "4",
        "--seed",
        "0",
        *DEMO_PROMPTS,
    ).split()
    print(run("evaluate", "--checkpoint", str(args.out), "--num-captions", "24"), end="")
    print(f"grid of {len(DEMO_PROMPTS)} prompts x 4 images: {paths[-1]}")


if __name__ == "__main__":
    main()
