"""The 8-bit averaging codec's CPU cost: hivemind's ``Uniform8BitQuantization`` vs ours.

    python -m benchmarks.bench_codec [--values 524288] [--repeats 30] [--threads 1]

Times ``compress`` (tensor -> hivemind's protobuf message) and ``extract`` (message -> tensor) of
one averaging part (default 2**19 float32 values, hivemind's 512 KiB part) with both codecs, in
one process, interleaved so that a busy machine slows both alike; prints ns per value and the
ratios. Also says whether both codecs write messages of one size and read each other's alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from hivemind.compression import CompressionInfo
from hivemind.compression.quantization import Uniform8BitQuantization

from dalle_together.swarm.compression import FastUniform8BitQuantization


def _median_ns_per_value(fn: Callable[[], object], repeats: int, values: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--values", type=int, default=2**19, help="values per part (hivemind's: 2**19)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an averager's: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tensor = torch.randn(args.values, generator=torch.Generator().manual_seed(0)) * 1e-3
    stock, fast = Uniform8BitQuantization(), FastUniform8BitQuantization()
    info = CompressionInfo.from_tensor(tensor, key=0)
    stock_msg, fast_msg = stock.compress(tensor, info), fast.compress(tensor, info)
    same_size = len(stock_msg.buffer) == len(fast_msg.buffer)
    cross = torch.equal(stock.extract(fast_msg), fast.extract(fast_msg)) and torch.equal(
        fast.extract(stock_msg), stock.extract(stock_msg)
    )

    rows = {name: {"encode": [], "decode": []} for name in ("hivemind", "dalle-together")}
    for _ in range(3):  # interleaved rounds: machine noise hits both codecs alike
        for name, codec, msg in (("hivemind", stock, stock_msg), ("dalle-together", fast, fast_msg)):
            rows[name]["encode"].append(
                _median_ns_per_value(lambda c=codec: c.compress(tensor, info), args.repeats, args.values)
            )
            rows[name]["decode"].append(
                _median_ns_per_value(lambda c=codec, m=msg: c.extract(m), args.repeats, args.values)
            )

    print(f"{args.values} values, {args.threads} thread(s); messages of the same size: {same_size}, "
          f"each decodes the other's messages identically: {cross}")  # fmt: skip
    print("| codec | encode (ns/value) | decode (ns/value) |")
    print("|---|---|---|")
    best = {name: {op: min(v) for op, v in ops.items()} for name, ops in rows.items()}
    for name, ops in best.items():
        print(f"| {name} | {ops['encode']:.2f} | {ops['decode']:.2f} |")
    for op in ("encode", "decode"):
        print(f"{op}: hivemind / ours = {best['hivemind'][op] / best['dalle-together'][op]:.2f}x")


if __name__ == "__main__":
    main()
