"""Generation with the KV cache vs recomputing the whole sequence for every image code.

    python -m benchmarks.bench_kv_cache                       # tiny preset, 8x8 codes, batch 1/16/64
    python -m benchmarks.bench_kv_cache --grid 16 --json kv.json   # and a 16x16 grid (256 codes)

Without a cache every step reruns the whole prefix, so the saving grows with the batch and the
sequence; at batch 1 the per-step overhead of a tiny model (a hundred small kernels) dominates.

Both paths run in the same process on the same randomly initialised model (timing does not depend
on the weights), each best of ``--repeats`` runs, and must draw the same codes for the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from dalle_together.config import BOS_ID, ModelConfig, preset
from dalle_together.model import DalleTransformer
from dalle_together.sampling import sample_image_tokens


def time_sampling(
    model: DalleTransformer, text: torch.Tensor, *, use_cache: bool, repeats: int
) -> tuple[float, torch.Tensor]:
    """Best wall-clock seconds over ``repeats`` runs (after one warm-up) and the codes drawn."""
    tokens = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = sample_image_tokens(
            model, text, generator=torch.Generator().manual_seed(0), use_cache=use_cache
        )
        if text.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, tokens


def measure(
    cfg: ModelConfig, *, preset_name: str, batch_size: int, repeats: int, device: str
) -> dict[str, Any]:
    """One row of the table: cached vs uncached generation of a batch under model config ``cfg``."""
    torch.manual_seed(0)
    model = DalleTransformer(cfg).to(device).eval()
    text = torch.randint(2, cfg.text_vocab_size, (batch_size, cfg.text_len), device=device)
    text[:, 0] = BOS_ID
    cached_s, cached = time_sampling(model, text, use_cache=True, repeats=repeats)
    uncached_s, uncached = time_sampling(model, text, use_cache=False, repeats=repeats)
    return {
        "preset": preset_name,
        "grid": cfg.image_grid,
        "image_tokens": cfg.image_len,
        "batch_size": batch_size,
        "cached_s": round(cached_s, 4),
        "uncached_s": round(uncached_s, 4),
        "speedup": round(uncached_s / cached_s, 2),
        "cached_codes_per_s": round(batch_size * cfg.image_len / cached_s, 1),
        "same_tokens": bool(cached.equal(uncached)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument(
        "--grid", type=int, action="append", default=[], help="also measure this code-grid side (repeatable)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1, 16, 64],
        help="batch sizes to measure (default: 1 16 64)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per path, after a warm-up (best counts)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    base = preset(args.preset).model
    configs = [base] + [dataclasses.replace(base, image_grid=g) for g in args.grid if g != base.image_grid]
    rows = [
        measure(cfg, preset_name=args.preset, batch_size=batch_size, repeats=args.repeats, device=args.device)
        for cfg in configs
        for batch_size in args.batch_size
    ]

    header = f"{'preset':<8}{'grid':>6}{'codes':>7}{'batch':>7}{'cached s':>11}{'uncached s':>12}{'speedup':>9}{'same':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<8}{r['grid']:>6}{r['image_tokens']:>7}{r['batch_size']:>7}{r['cached_s']:>11.3f}"
            f"{r['uncached_s']:>12.3f}{r['speedup']:>8.1f}x{('yes' if r['same_tokens'] else 'NO'):>6}"
        )
    result = {
        "benchmark": "kv_cache",
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
