"""All-reduce of a model-sized set of tensors across N peers on capped links, against the bound.

    python -m benchmarks.bench_averaging [--quick | --full] [--json F] [--markdown F] [--plot F.png]
        [--logs DIR]

Each peer is a process in its own testbed host (network namespace, link capped with tbf both ways,
100 Mbit/s by default), with its own DHT (all bootstrap from peer 0) and one hivemind
``DecentralizedAverager``: the all-reduce that ``hivemind.Optimizer`` runs for dalle-together,
with the compression ``dalle_together.swarm.optimizer.averaging_compression`` builds (``8bit``:
8-bit uniform quantisation of tensors from ``size_adaptive_threshold`` elements, fp16 below),
the state-donor declarations of ``QuietDeclarationsMixin`` (``--hivemind-declarations``:
hivemind's own, which re-store the peer's DHT record after every tensor of every round) and the
in-place results of ``InPlaceAveragingMixin``, as the swarm's averagers (``--hivemind-updates``:
hivemind's own, which keeps a tensor's averaged parts until it is complete and adds it then). The
averager's peak memory is its process's peak resident set.

The tensors are shaped like a transformer's (per layer of width 1024: qkv, output, MLP matrices,
biases, layer norms): 2 layers = 25.2M parameters, 8 layers = 100.7M; each peer's values are
independent standard normals (like gradients of different batches).

What is timed: matchmaking is done first and excluded (each peer calls ``step(require_trigger=
True)`` and waits until its group is assembled); then every peer allows the all-reduce at the same
wall-clock instant, and the round's time is the time from that instant until the *last* peer has
its averaged tensors in place: compression, transfer, reduction, decompression and the update,
everything a training step waits for. Bytes are the frames each peer's interface sent during that
time (TCP/IP and Ethernet headers, libp2p framing and protobuf included). A training run averages
every epoch over the same connections, so the first ``--warmup-rounds`` rounds (1 by default: the
first round dials the connections between peers that only knew the first one, and TCP learns each
link's rate) are reported apart and the median of the rounds after them is the result; the
numerical error is ``||average - exact mean|| / ||exact mean||`` of peer 0's result after the
first timed round.

Bounds: ``S`` is the compressed size of one peer's tensors, ``B`` the link's rate in bytes/s; a
bandwidth-optimal all-reduce (reduce-scatter then all-gather) sends ``2 (N-1)/N * S`` bytes per peer
and takes ``2 (N-1)/N * S / B``. One TCP stream carries at most ~95% of a link's rate as payload
(headers), so even perfect overlap gives time/bound ≈ 1.05. What TCP itself achieves with this
traffic is measured too, on the same links right after the rounds: "plain TCP" is the time every
host takes to send ``2 S / N`` bytes to every other host and receive as many, all at once (the
bytes the all-reduce moves between each pair, in one stream per pair and direction; median of
three exchanges, :meth:`benchmarks.testbed.Testbed.measure_exchange`), the floor that TCP's
ramp-up and sharing of a link leave any all-reduce here.

Peers run with one torch/OMP thread each and ``QUANTIZATION_THREADS`` (hivemind's quantisation
thread pool, 128 by default) set by ``--quantization-threads``. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import write_report
from benchmarks.testbed.peers import PeerProcess, start_peers

WIDTH = 1024
SIZES = {"25M": 2, "100M": 8}
"""Model size name -> number of transformer layers of width :data:`WIDTH`."""
COMPRESSIONS = ("none", "fp16", "8bit")
MATCHMAKING_TIME_S = 2.0
"""Each peer's ``min_matchmaking_time``: matchmaking is not timed, only the all-reduce after it."""


def layer_shapes(width: int) -> list[tuple[int, ...]]:
    """The parameter shapes of one transformer layer: attention (qkv, output), MLP (4x), 2 norms."""
    return [
        (3 * width, width), (3 * width,), (width, width), (width,),  # attention
        (4 * width, width), (4 * width,), (width, 4 * width), (width,),  # MLP
        (width,), (width,), (width,), (width,),  # two layer norms: weight, bias
    ]  # fmt: skip


def model_shapes(size: str) -> list[tuple[int, ...]]:
    return layer_shapes(WIDTH) * SIZES[size]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def compressed_bytes(size: str, compression: str, threshold: int) -> int:
    """S: bytes of one peer's tensors after compression (what hivemind sizes its parts by)."""
    total = 0
    for shape in model_shapes(size):
        n = numel(shape)
        bytes_per_value = {"none": 4, "fp16": 2, "8bit": 1 if n >= threshold else 2}[compression]
        total += n * bytes_per_value
    return total


# --- one peer (runs inside a testbed host) ----------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    index: int
    num_peers: int
    size: str
    compression: str
    address: str
    initial_peer: str | None
    part_size_bytes: int
    threshold: int
    hivemind_declarations: bool = False
    hivemind_updates: bool = False


def peer_tensor(spec: PeerSpec, peer: int, k: int, shape: tuple[int, ...]):
    """Tensor ``k`` of peer ``peer``: standard normals from a seed only they determine, so that any
    peer can regenerate any other's (for the exact mean) without receiving it."""
    import torch

    generator = torch.Generator().manual_seed(1_000_003 * peer + k)
    return torch.randn(shape, generator=generator)


def run_peer(spec: PeerSpec) -> None:
    """A benchmark peer: commands on stdin (``step``, ``go <unix time>``, ``error``, ``quit``), one
    JSON line per answer on stdout."""
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    from dalle_together.swarm.allreduce import InPlaceAveragingMixin
    from dalle_together.swarm.optimizer import (
        QuietDeclarationsMixin,
        averaging_compression,
        matchmaking_request_timeout,
    )

    torch.set_num_threads(1)
    shapes = model_shapes(spec.size)
    tensors = [peer_tensor(spec, spec.index, k, s) for k, s in enumerate(shapes)]
    dht = hivemind.DHT(
        start=True,
        host_maddrs=[f"/ip4/{spec.address}/tcp/0"],
        initial_peers=[spec.initial_peer] if spec.initial_peer else [],
    )
    mixins = [] if spec.hivemind_declarations else [QuietDeclarationsMixin]
    mixins += [] if spec.hivemind_updates else [InPlaceAveragingMixin]
    averager_class = type("Averager", (*mixins, hivemind.averaging.DecentralizedAverager), {})
    averager = averager_class(
        tensors,
        dht,
        start=True,
        prefix="bench_averaging",
        target_group_size=spec.num_peers,
        min_group_size=spec.num_peers,
        min_matchmaking_time=MATCHMAKING_TIME_S,
        request_timeout=matchmaking_request_timeout(MATCHMAKING_TIME_S),
        compression=averaging_compression(spec.compression, spec.threshold),
        part_size_bytes=spec.part_size_bytes,
        allreduce_timeout=600.0,
    )

    def say(**message: Any) -> None:
        print(json.dumps(message), flush=True)

    say(address=str(dht.get_visible_maddrs()[0]))
    control = None
    for line in sys.stdin:
        command, *args = line.split()
        if command == "step":  # reset this peer's values, then assemble the group and wait
            with averager.get_tensors() as local:
                for k, (tensor, shape) in enumerate(zip(local, shapes, strict=True)):
                    tensor.copy_(peer_tensor(spec, spec.index, k, shape))
            control = averager.step(wait=False, require_trigger=True, timeout=120.0)
            while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
                time.sleep(0.01)
            say(ready=control.stage == AveragingStage.AWAITING_TRIGGER)
        elif command == "go":  # all-reduce from the given instant
            start = float(args[0])
            time.sleep(max(start - time.time(), 0.0))
            control.allow_allreduce()
            control.result(timeout=600.0)
            say(seconds=time.time() - start)
        elif command == "error":
            say(relative_error=relative_error(spec, averager, shapes))
        elif command == "memory":  # the averager process's peak resident set
            status = Path(f"/proc/{averager.pid}/status").read_text()
            say(peak_mb=int(status.split("VmHWM:")[1].split()[0]) / 1024)
        elif command == "quit":
            break
    averager.shutdown()
    dht.shutdown()


def relative_error(spec: PeerSpec, averager, shapes: list[tuple[int, ...]]) -> float:
    """``||averaged - exact mean|| / ||exact mean||`` over all tensors of this peer."""
    error_sq = norm_sq = 0.0
    with averager.get_tensors() as local:
        for k, shape in enumerate(shapes):
            exact = sum(peer_tensor(spec, p, k, shape) for p in range(spec.num_peers)) / spec.num_peers
            error_sq += float((local[k] - exact).pow(2).sum())
            norm_sq += float(exact.pow(2).sum())
    return (error_sq / norm_sq) ** 0.5


# --- the orchestrator ---------------------------------------------------------------------------


def measure(
    tb, *, size: str, compression: str, rounds: int, rate_mbit: float, part_size_bytes: int,
    threshold: int, quantization_threads: int, logs: Path, hivemind_declarations: bool = False,
    hivemind_updates: bool = False, warmup_rounds: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """One setting: start the peers, run ``warmup_rounds`` and then ``rounds`` timed all-reduces, stop
    the peers."""
    n = len(tb.hosts)
    peers: list[PeerProcess] = []

    def start(i: int, host, initial_peer: str | None) -> PeerProcess:
        spec = PeerSpec(
            i,
            n,
            size,
            compression,
            host.address,
            initial_peer,
            part_size_bytes,
            threshold,
            hivemind_declarations,
            hivemind_updates,
        )
        peer = PeerProcess.spawn(
            host, "benchmarks.bench_averaging", ["--peer", json.dumps(asdict(spec))],
            log=logs / f"{size}-{compression}-n{n}-p{i}.log",
            env={"QUANTIZATION_THREADS": str(quantization_threads)},
        )  # fmt: skip
        peers.append(peer)  # before it answers: the finally below stops it whatever happens
        return peer

    try:
        start_peers(tb, start, timeout_s=180)
        warmup_times, times, sent, cpu, error = [], [], [], [], None
        for r in range(warmup_rounds + rounds):
            for peer in peers:
                peer.send("step")
            if not all(peer.answer(timeout_s=180)["ready"] for peer in peers):
                raise RuntimeError("matchmaking failed")
            before = [tb.tx_bytes(i) for i in range(n)]
            cpu_before = sum(tb.cpu_seconds(i) for i in range(n))
            start = time.time() + 0.3
            for peer in peers:
                peer.send(f"go {start}")
            answers = [peer.answer(timeout_s=900) for peer in peers]
            after = [tb.tx_bytes(i) for i in range(n)]
            if r < warmup_rounds:
                warmup_times.append(max(a["seconds"] for a in answers))
                continue
            cpu.append(sum(tb.cpu_seconds(i) for i in range(n)) - cpu_before)
            times.append(max(a["seconds"] for a in answers))
            sent.append(statistics.mean(a - b for a, b in zip(after, before, strict=True)))
            if r == warmup_rounds:
                peers[0].send("error")
                error = peers[0].answer(timeout_s=900)["relative_error"]
        for peer in peers:
            peer.send("memory")
        peak_mb = max(peer.answer(timeout_s=60)["peak_mb"] for peer in peers)
        for peer in peers:
            peer.send("quit")
        for peer in peers:
            peer.proc.wait(60)
    finally:
        for peer in peers:
            if peer.proc.poll() is None:
                peer.proc.kill()
    s_bytes = compressed_bytes(size, compression, threshold)
    bound_bytes = 2 * (n - 1) / n * s_bytes
    bound_s = bound_bytes / (rate_mbit * 1e6 / 8)
    seconds = statistics.median(times)
    tcp_seconds = statistics.median(tb.measure_exchange(round(2 * s_bytes / n)) for _ in range(3))
    return {
        "size": size,
        "params": sum(numel(s) for s in model_shapes(size)),
        "compression": compression,
        "hivemind_declarations": hivemind_declarations,
        "hivemind_updates": hivemind_updates,
        "peers": n,
        "rate_mbit": rate_mbit,
        "rounds": rounds,
        "warmup_seconds": warmup_times,
        "compressed_bytes": s_bytes,
        "seconds": seconds,
        "all_seconds": times,
        "bound_seconds": bound_s,
        "time_over_bound": seconds / bound_s,
        "tcp_exchange_seconds": tcp_seconds,
        "tcp_over_bound": tcp_seconds / bound_s,
        "sent_bytes_per_peer": statistics.median(sent),
        "bound_bytes_per_peer": bound_bytes,
        "bytes_over_bound": statistics.median(sent) / bound_bytes,
        "relative_error": error,
        "cpu_seconds_all_peers": statistics.median(cpu),
        "cpu_cores_busy": statistics.median(c / t for c, t in zip(cpu, times, strict=True)),
        "averager_peak_mb": peak_mb,
    }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        "| params | compression | peers | link Mbit/s | all-reduce s | bound s | time / bound "
        "| plain TCP / bound | warm-up round / bound | sent MB/peer | bound MB | sent / bound | relative error "
        "| CPU cores busy | averager peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        warmup = " / ".join(f"{t / r['bound_seconds']:.2f}" for t in r["warmup_seconds"]) or "-"
        lines.append(
            f"| {r['size']} | {r['compression']} | {r['peers']} | {r['rate_mbit']:g} | {r['seconds']:.2f} "
            f"| {r['bound_seconds']:.2f} | **{r['time_over_bound']:.2f}** | {r['tcp_over_bound']:.2f} | {warmup} "
            f"| {r['sent_bytes_per_peer'] / 1e6:.1f} "
            f"| {r['bound_bytes_per_peer'] / 1e6:.1f} | {r['bytes_over_bound']:.3f} | {r['relative_error']:.1e} "
            f"| {r['cpu_cores_busy']:.2f} | {r['averager_peak_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in results}, key=lambda s: SIZES[s])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes, strict=True):
        for compression in COMPRESSIONS:
            points = sorted((r["peers"], r["time_over_bound"]) for r in results
                            if r["size"] == size and r["compression"] == compression)  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=compression)
        floor = sorted((r["peers"], r["tcp_over_bound"]) for r in results
                       if r["size"] == size and r["compression"] == "8bit")  # fmt: skip
        if floor:
            ax.plot(*zip(*floor, strict=True), color="gray", marker="x", linestyle="--",
                    label="plain TCP, 8bit's bytes")  # fmt: skip
        ax.axhline(1.0, color="gray", linestyle=":", label="bound")
        ax.axhline(1.3, color="red", linestyle="--", linewidth=0.8, label="1.3 x bound")
        ax.set(title=f"{size} parameters", xlabel="peers N", ylabel="all-reduce time / bound")
        ax.set_xticks(sorted({r["peers"] for r in results}))
        ax.legend()
    fig.suptitle(f"All-reduce on {results[0]['rate_mbit']:g} Mbit/s links (median of rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run one peer from this JSON spec
    setting = parser.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true", help="25M parameters, N=2 and 4, 2 rounds (default)")
    setting.add_argument("--full", action="store_true", help="25M and 100M, N=2, 4 and 8, 3 rounds")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES))
    parser.add_argument("--peers", nargs="+", type=int)
    parser.add_argument("--compressions", nargs="+", choices=COMPRESSIONS)
    parser.add_argument("--rounds", type=int, help="timed rounds, after the warm-up rounds")
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="rounds run first and reported apart (new connections, TCP learning each link's rate)",
    )
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument(
        "--congestion-control",
        help="the hosts' TCP congestion control (cubic, reno, bbr; default: this machine's)",
    )
    parser.add_argument("--part-size-bytes", type=int, default=2**19, help="hivemind's default: 512 KiB")
    parser.add_argument("--quantization-threads", type=int, default=1)
    parser.add_argument(
        "--hivemind-declarations",
        action="store_true",
        help="declare each peer a state donor as hivemind 1.1.12 does (again after every tensor of every "
        "round), not as dalle-together does (when the declaration changes)",
    )
    parser.add_argument(
        "--hivemind-updates",
        action="store_true",
        help="add the averaged results to the tensors as hivemind 1.1.12 does (a tensor once all its "
        "parts are in), not as dalle-together does (each part as it arrives)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep every peer's log here (default: a temporary directory, removed at the end)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, default=Path("runs/bench/bench_averaging.md"))
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/bench_averaging.png"))
    args = parser.parse_args()
    if args.peer:
        return run_peer(PeerSpec(**json.loads(args.peer)))

    from benchmarks.testbed import Testbed, cleanup_stale, testbed_available
    from dalle_together.config import SwarmConfig

    available, reason = testbed_available()
    if not available:
        sys.exit(f"bench_averaging needs the network testbed: {reason}")
    cleanup_stale()
    sizes = args.sizes or (["25M", "100M"] if args.full else ["25M"])
    peer_counts = args.peers or ([2, 4, 8] if args.full else [2, 4])
    compressions = args.compressions or list(COMPRESSIONS)
    rounds = args.rounds or (3 if args.full else 2)
    threshold = SwarmConfig().size_adaptive_threshold
    command = "python -m benchmarks.bench_averaging " + " ".join(sys.argv[1:])
    results = []
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        logs_dir = contextlib.nullcontext(str(args.logs))
    else:
        logs_dir = tempfile.TemporaryDirectory(prefix="bench-averaging-")
    with logs_dir as logs:
        for n in peer_counts:
            with Testbed(n, rate_mbit=args.rate_mbit, congestion_control=args.congestion_control) as tb:
                for size in sizes:
                    for compression in compressions:
                        result = measure(
                            tb, size=size, compression=compression, rounds=rounds, rate_mbit=args.rate_mbit,
                            part_size_bytes=args.part_size_bytes, threshold=threshold,
                            quantization_threads=args.quantization_threads, logs=Path(logs),
                            hivemind_declarations=args.hivemind_declarations,
                            hivemind_updates=args.hivemind_updates,
                            warmup_rounds=args.warmup_rounds,
                        )  # fmt: skip
                        results.append(result)
                        print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}), flush=True)
    write_report(
        command=command, table=markdown(results, command), results=results, markdown=args.markdown,
        json_path=args.json, plot=plot, plot_path=args.plot,
    )  # fmt: skip


if __name__ == "__main__":
    main()
