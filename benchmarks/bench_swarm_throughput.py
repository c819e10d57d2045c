"""Training throughput alone, with one volunteer, and with two volunteers, on one machine.

    python -m benchmarks.bench_swarm_throughput [--seconds 60] [--pin] [--json swarm.json]

(a) ``local``: ``train.local_step`` in a loop on one torch thread: the tiny model, batch ``B``,
    data drawn and tokenized as in training, a plain AdamW step every batch.
(b) ``one volunteer``: a coordinator and one ``dalle-together join --threads 1`` (real CLI
    subprocesses on loopback), same model and batch size.
(c) ``two volunteers``: the same coordinator with two such volunteers.

Settings are what a user of this machine would pick: batch 16 per step (the fastest local batch
on one thread), the tiny preset's averaging (fp16, 2 s matchmaking, delayed updates), and a target
batch of 2048 samples, so that an epoch lasts ~12 s with two volunteers and ~20 s with one: at
least ten times the time spent forming a group and averaging (~1 s), the rule of thumb for a
collaboration, and checkpoints every 10^6 epochs (never, within the benchmark: the coordinator's
downloads would compete for the CPU; in a real run, every 5 epochs cost it a second of download).

``--pin`` confines volunteer i with all its processes (DHT, p2p daemon, averagers) to CPU i, and (a)
to CPU 0: each volunteer then is a 1-core machine. Unpinned, a lone volunteer's background work
runs on the idle second core, which in (c) belongs to the other volunteer, so (c)/(b) understates
what a second machine adds.

Volunteers' throughput is read from their own progress lines (samples contributed, timestamped
as they arrive) over a window that starts after a warm-up, and the CPU time of every process
tree (the coordinator's, each volunteer's: DHT, p2p daemon and averagers included) is read from
/proc over the same window. The issue asks for (c)/(b) >= 1.8 and (b)/(a) >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# one thread in this process too, before torch is imported (scenario (a) runs here)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

from dalle_together.config import preset  # noqa: E402
from dalle_together.data import all_attributes  # noqa: E402
from dalle_together.demo import ADDRESS, CliProcess  # noqa: E402
from dalle_together.optim import build_optimizer  # noqa: E402
from dalle_together.processes import CLOCK_TICKS, tree_cpu_s  # noqa: E402
from dalle_together.tokenizers.text import TextTokenizer  # noqa: E402
from dalle_together.tokenizers.vqvae import save_vqvae, train_vqvae  # noqa: E402
from dalle_together.train import build_model, local_step, token_batches  # noqa: E402

CONTRIBUTED = re.compile(r"contributed (\d+) samples")


# --- CPU time of the machine, from /proc -------------------------------------------------------


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


# --- the scenarios ----------------------------------------------------------------------------


def prepare_tokenizers(directory: Path) -> None:
    """Tokenizers for the tiny preset; a briefly trained VQ-VAE (throughput does not depend on it)."""
    cfg = preset("tiny")
    TextTokenizer.train([a.caption for a in all_attributes("all")], cfg.text).save(directory)
    vqvae, _ = train_vqvae(cfg.vq, seed=cfg.data.seed, steps=5)
    save_vqvae(vqvae, directory)


def measure_local(directory: Path, *, batch_size: int, warmup_s: float, seconds: float) -> dict[str, Any]:
    """(a): the training loop on one machine, one thread."""
    torch.set_num_threads(1)
    cfg = preset("tiny")
    text_tokenizer, vqvae = TextTokenizer.load(directory), _load_vqvae(directory)
    model = build_model(cfg)
    optimizer = build_optimizer(model.param_groups(cfg.optim.weight_decay), cfg.optim)
    batches = token_batches(cfg, text_tokenizer, vqvae, batch_size=batch_size)
    model.train()
    started = time.monotonic()
    while time.monotonic() - started < warmup_s:
        local_step(model, next(batches), optimizer, device="cpu")
    cpu0, t0, machine0, steps = time.process_time(), time.monotonic(), machine_cpu_s(), 0
    while time.monotonic() - t0 < seconds:
        local_step(model, next(batches), optimizer, device="cpu")
        steps += 1
    elapsed, machine1, ours = time.monotonic() - t0, machine_cpu_s(), time.process_time() - cpu0
    return {
        "samples_per_second": steps * batch_size / elapsed,
        "cpu_share": ours / elapsed / os.cpu_count(),
        "other_processes_cpu_share": max(machine1[0] - machine0[0] - ours, 0.0) / elapsed / os.cpu_count(),
        "stolen_cpu_share": (machine1[1] - machine0[1]) / elapsed / os.cpu_count(),
    }


def _load_vqvae(directory: Path):
    from dalle_together.tokenizers.vqvae import load_vqvae

    return load_vqvae(directory)


def samples_at(volunteer: CliProcess, after: float, before: float) -> tuple[float, int, float, int]:
    """First and last (time, samples contributed) progress lines of ``volunteer`` within [after, before]."""
    points = [
        (t, int(m.group(1)))
        for t, line in volunteer.stderr
        if (m := CONTRIBUTED.search(line)) and after <= t <= before
    ]
    if len(points) < 2:
        raise RuntimeError(f"{volunteer.name} reported no progress in the measurement window")
    return (*points[0], *points[-1])


def measure_swarm(
    coordinator: CliProcess,
    address: str,
    work: Path,
    *,
    volunteers: int,
    pin: bool,
    batch_size: int,
    warmup_s: float,
    seconds: float,
    report_every_s: float,
    echo: bool,
    nice: int | None = None,
) -> dict[str, Any]:
    """(b) or (c): ``volunteers`` 1-thread volunteers training with ``coordinator``."""
    peers = [
        CliProcess(
            f"v{volunteers}-{i}",
            [
                "join",
                "--initial-peers",
                address,
                "--run-id",
                "bench",
                "--name",
                f"v{volunteers}-{i}",
                "--batch-size",
                str(batch_size),
                "--threads",
                "1",
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
                "--cache-dir",
                str(work / f"v{volunteers}-{i}"),
                "--report-every",
                str(report_every_s),
                *(["--nice", str(nice)] if nice is not None else []),
            ],
            echo=echo,
            cpus={i} if pin else None,
        )  # fmt: skip
        for i in range(volunteers)
    ]
    try:
        for peer in peers:  # wait until every volunteer trains, then warm up
            _wait_for_progress(peer, timeout_s=180)
        time.sleep(warmup_s)
        window_start, machine0 = time.monotonic(), machine_cpu_s()
        cpu0 = {p.name: tree_cpu_s(p.pid) for p in peers} | {"coordinator": tree_cpu_s(coordinator.pid)}
        time.sleep(seconds)
        window_end, machine1 = time.monotonic(), machine_cpu_s()
        cpu1 = {p.name: tree_cpu_s(p.pid) for p in peers} | {"coordinator": tree_cpu_s(coordinator.pid)}
        elapsed = window_end - window_start
        ours = sum(cpu1.values()) - sum(cpu0.values())
        rates = {}
        for p in peers:
            t0, s0, t1, s1 = samples_at(p, window_start, window_end + report_every_s)
            rates[p.name] = (s1 - s0) / (t1 - t0)
        cpu_share = {name: (cpu1[name] - cpu0[name]) / elapsed / os.cpu_count() for name in cpu0}
        epochs = [
            int(m.group(1))
            for p in peers
            for _, line in p.stderr
            if (m := re.search(r"epoch (\d+) \|", line))
        ]
        return {
            "samples_per_second": sum(rates.values()),
            "per_volunteer": rates,
            "cpu_share": cpu_share,
            # anything else running on the machine (or its hypervisor) skews the comparison
            "other_processes_cpu_share": max(machine1[0] - machine0[0] - ours, 0.0)
            / elapsed
            / os.cpu_count(),
            "stolen_cpu_share": (machine1[1] - machine0[1]) / elapsed / os.cpu_count(),
            "epochs_reached": max(epochs, default=0),
        }
    finally:
        for p in peers:
            p.stop(timeout_s=60)


def start_coordinator(work: Path, args: argparse.Namespace) -> tuple[CliProcess, str]:
    run_dir = work / "coordinator"
    run_dir.mkdir()
    for name in ("text_tokenizer.json", "vqvae.json", "vqvae.safetensors"):
        shutil.copy(work / name, run_dir / name)
    coordinator_args = [
        "coordinator",
        "--run-id", "bench",
        "--checkpoint-dir", str(run_dir),
        "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        "--target-batch-size", str(args.target_batch_size),
        "--checkpoint-every-epochs", "1000000",  # keep the coordinator's CPU for the volunteers
        "--status-every", "30",
    ]  # fmt: skip
    if args.matchmaking_time is not None:
        coordinator_args += ["--matchmaking-time", str(args.matchmaking_time)]
    coordinator = CliProcess("coordinator", coordinator_args, echo=args.echo)
    return coordinator, coordinator.wait_for_stdout(ADDRESS, timeout_s=120)


def _wait_for_progress(peer: CliProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(CONTRIBUTED.search(line) for _, line in peer.stderr):
        if peer.proc.poll() is not None:
            raise RuntimeError(f"{peer.name} exited: " + "\n".join(line for _, line in peer.stderr[-20:]))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.name} did not start training")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window of each scenario")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of training before each window")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per local step")
    parser.add_argument(
        "--target-batch-size",
        type=int,
        default=2048,
        help="samples per optimizer step (see the module's docstring)",
    )
    parser.add_argument("--matchmaking-time", type=float, default=None, help="default: the preset's")
    parser.add_argument("--report-every", type=float, default=10.0, help="volunteers' progress period, s")
    parser.add_argument("--nice", type=int, default=None, help="volunteers' `join --nice` (default: join's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--echo", action="store_true", help="show the peers' output")
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these scenarios")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run (a), (b), (c) this many times, alternating"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="confine volunteer i (and its DHT, p2p daemon and averagers) to CPU i, and (a) to CPU 0: "
        "each volunteer then has one core of its own, like a 1-core machine",
    )
    args = parser.parse_args()
    only = set(args.only or ("a", "b", "c"))

    work = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    coordinator = None
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "one_volunteer": [], "two_volunteers": []}
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "preset": "tiny",
        "batch_size": args.batch_size,
        "target_batch_size": args.target_batch_size,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "pinned": args.pin,
        "nice": args.nice,
        "repeats": args.repeats,
    }
    try:
        prepare_tokenizers(work)
        coordinator, address = None, None
        if only & {"b", "c"}:
            coordinator, address = start_coordinator(work, args)
        # the scenarios alternate, so that a slow spell of the machine does not fall on one of them
        for repeat in range(args.repeats):
            if "a" in only:
                everywhere = os.sched_getaffinity(0)
                if args.pin:
                    os.sched_setaffinity(0, {0})
                try:
                    r = measure_local(
                        work, batch_size=args.batch_size, warmup_s=args.warmup / 2, seconds=args.seconds
                    )
                finally:
                    os.sched_setaffinity(0, everywhere)
                runs["local"].append(r)
                print(f"[{repeat}] (a) local: {r['samples_per_second']:.1f} samples/s", flush=True)
            for key, label, n in (("b", "one_volunteer", 1), ("c", "two_volunteers", 2)):
                if key in only:
                    r = measure_swarm(
                        coordinator,
                        address,
                        work,
                        volunteers=n,
                        pin=args.pin,
                        batch_size=args.batch_size,
                        warmup_s=args.warmup,
                        seconds=args.seconds,
                        report_every_s=args.report_every,
                        echo=args.echo,
                        nice=args.nice,
                    )
                    runs[label].append(r)
                    print(
                        f"[{repeat}] ({key}) {n} volunteer(s): {r['samples_per_second']:.1f} samples/s "
                        f"(coordinator CPU {r['cpu_share']['coordinator']:.1%} of the machine, "
                        f"other processes {r['other_processes_cpu_share']:.1%})",
                        flush=True,
                    )
    finally:
        if coordinator is not None:
            coordinator.stop(timeout_s=60)
        shutil.rmtree(work, ignore_errors=True)

    rate = {}
    for label, measured in runs.items():
        if measured:
            results[label] = {
                "samples_per_second": statistics.median(r["samples_per_second"] for r in measured),
                "runs": measured,
            }
            rate[label] = results[label]["samples_per_second"]
    print(
        f"medians over {args.repeats} run(s): " + ", ".join(f"{k} {v:.1f} samples/s" for k, v in rate.items())
    )
    if "two_volunteers" in rate and "one_volunteer" in rate:
        results["two_over_one"] = rate["two_volunteers"] / rate["one_volunteer"]
        print(f"(c)/(b) = {results['two_over_one']:.2f}  (needs >= 1.8)")
    if "one_volunteer" in rate and "local" in rate:
        results["one_over_local"] = rate["one_volunteer"] / rate["local"]
        print(f"(b)/(a) = {results['one_over_local']:.2f}  (needs >= 0.9)")
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main()
