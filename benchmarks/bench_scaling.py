"""Simulated-compute volunteers with real communication: how much of their time do they compute?

    python -m benchmarks.bench_scaling [--quick | --full] [--json F] [--markdown F] [--plot F.png]

Each volunteer is a process forked from this one into its own testbed host (network namespace,
link capped with tbf both ways) running the product's optimizer,
``dalle_together.swarm.optimizer.make_swarm_optimizer``: ``hivemind.Optimizer`` with delayed optimizer steps and delayed gradient averaging, offloaded
optimizer, 8-bit averaging compression, state averaging every few epochs: the production
``SwarmConfig`` (15 s matchmaking), over a model-sized parameter set (a stack of square Linear
layers: 25M parameters by default). Only the computation is simulated: a "local step" is a
``time.sleep`` of ``base_step_s / speed`` (speeds cycle 1x, 2x, 4x: volunteers of very different
machines), after which the gradients, fixed synthetic values set once, are handed to
``optimizer.step()`` as after a real backward pass. Everything the optimizer does - accumulating
gradients, matchmaking, the all-reduce of real-sized compressed tensors over the capped links,
the offloaded AdamW step, state averaging - is real.

Reported per setting, over a measurement window after a warm-up:

- compute utilisation of each volunteer: time spent in the simulated compute / wall time; the rest
  is time blocked in ``optimizer.step()`` (accumulating, waiting for a delayed update, ...);
- swarm samples/s: samples the volunteers processed per second, against the ideal sum of their
  rates (every volunteer computing all the time); and the rate of optimizer steps (epochs);
- CPU cores the volunteers' processes used (DHT, p2p daemon and averagers included), and their
  memory: all volunteers share this machine's 2 cores, which a real swarm would not.

The target batch size is given as the seconds the whole group needs to accumulate it
(``--epoch-seconds``): ``target = epoch_s * sum of rates``. Needs root (network namespaces).

Time dilation (``--time-dilation K``): all volunteers share this machine's 2 cores, where a real
swarm gives each its own machine; beyond ~8 volunteers of a 25M model their communication alone
saturates the cores and utilisation measures the machine, not hivemind. A dilated run plays the
same swarm K times slower - step times, epochs and hivemind's timeouts times K, link rates over
K - so the same bytes and the same CPU work per round are spread over K times the wall time.
Utilisation is a ratio of times and unchanged by the scaling; rates and periods are converted
back to real time. What does not stretch (round-trip latencies, hivemind's fixed progress-report
and DHT refresh periods) is small against epochs of tens of seconds; the refreshes run K times
more often per simulated epoch, which costs CPU, not utilisation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.report import write_report
from benchmarks.testbed.peers import PEER_ENV, PeerProcess, start_peers

RUN_ID = "bench-scaling"
SPEEDS = (1, 2, 4)
"""Relative speeds of the volunteers, cycled: volunteer ``i`` computes at ``SPEEDS[i % 3]`` x."""
MALLOC_ARENAS, MALLOC_MMAP_THRESHOLD = 2, 65536
"""glibc's malloc keeps freed memory per thread arena, and hivemind's averagers allocate and free
model-sized buffers from many threads every round: two arenas, and buffers of 64 KiB and more
mapped and unmapped, took 8 volunteers of a 25M model from 18.2 to 12.7 GB (proportional set size)
at the same utilisation (93.9% and 92.7%)."""
MODEL_SIZES = {"6M": (1024, 6), "25M": (2048, 6), "100M": (4096, 6)}
"""Model size name -> (width, layers) of the Linear stack: 6 layers of width 2048 are 25.2M parameters."""


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One measured configuration."""

    num_volunteers: int
    rate_mbit: float
    model_size: str
    epoch_s: float
    """Seconds the whole group needs to accumulate the target batch when computing all the time."""
    base_step_s: float
    batch_size: int
    warmup_s: float
    measure_s: float
    time_dilation: float = 1.0
    """Run the setting this many times slower than real: step times, epochs and hivemind's
    timeouts multiplied, link rates divided. The volunteers then need this many times fewer CPU
    cores for the same communication, which lets 16 of them share 2 cores as 16 machines would not
    have to. Reported times, rates and samples/s are converted back to real time."""

    def wall_s(self, seconds: float) -> float:
        """How long ``seconds`` of the simulated swarm's time take on this machine."""
        return seconds * self.time_dilation

    def speed(self, index: int) -> int:
        return SPEEDS[index % len(SPEEDS)]

    def step_s(self, index: int) -> float:
        return self.base_step_s / self.speed(index)

    @property
    def ideal_samples_per_s(self) -> float:
        return sum(self.batch_size / self.step_s(i) for i in range(self.num_volunteers))

    @property
    def target_batch_size(self) -> int:
        return round(self.epoch_s * self.ideal_samples_per_s)


@dataclass(frozen=True, kw_only=True)
class VolunteerSpec:
    index: int
    setting: Setting
    address: str
    initial_peer: str | None


# --- one volunteer (runs inside a testbed host) ------------------------------------------------


def build_model(size: str):
    """A plain stack of square Linear layers with ``MODEL_SIZES[size]`` parameters, identical on
    every volunteer (seeded), as if all had downloaded the same state."""
    import torch

    width, layers = MODEL_SIZES[size]
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def run_volunteer(spec: VolunteerSpec) -> None:
    """Commands on stdin (``run <measure_from> <measure_until>`` in unix time, ``quit``); JSON lines
    on stdout (``address``/``ready``, then the window's measurements)."""
    import dataclasses

    import torch

    from dalle_together.config import SwarmConfig, preset
    from dalle_together.swarm.dht import configure_hivemind_logging, start_dht
    from dalle_together.swarm.optimizer import apply_pending_updates, make_swarm_optimizer
    from dalle_together.swarm.records import run_validators

    torch.set_num_threads(1)
    configure_hivemind_logging(verbose=False)
    setting = spec.setting

    def say(**message: Any) -> None:
        print(json.dumps(message), flush=True)

    dht = start_dht(
        initial_peers=[spec.initial_peer] if spec.initial_peer else [],
        host_maddrs=[f"/ip4/{spec.address}/tcp/0"],
        record_validators=run_validators(RUN_ID),
        startup_timeout_s=60.0,
    )
    say(address=str(dht.get_visible_maddrs()[0]))
    model = build_model(setting.model_size)
    tiny = preset("tiny")
    # the tiny preset's optimizer with this setting's batches; the production swarm settings, with
    # their timeouts stretched as the whole setting is
    swarm = SwarmConfig()
    cfg = tiny.replace(
        optim=dataclasses.replace(
            tiny.optim, batch_size=setting.batch_size, target_batch_size=setting.target_batch_size
        ),
        swarm=dataclasses.replace(
            swarm,
            matchmaking_time_s=setting.wall_s(swarm.matchmaking_time_s),
            allreduce_timeout_s=setting.wall_s(swarm.allreduce_timeout_s),
            averaging_timeout_s=setting.wall_s(swarm.averaging_timeout_s),
        ),
    )
    optimizer = make_swarm_optimizer(
        dht=dht,
        run_id=RUN_ID,
        model=model,
        cfg=cfg,
        batch_size_per_step=setting.batch_size,
        client_mode=False,
    )
    # what a backward pass would leave: different on every volunteer, small enough to train nothing
    # away; each gradient is one random row repeated (a view: no memory per volunteer for gradients),
    # averaged and sent as the full-sized tensor it stands for
    generator = torch.Generator().manual_seed(1000 + spec.index)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape[-1], generator=generator) * 1e-3).expand(p.shape)
    say(ready=True)

    command, *args = sys.stdin.readline().split()
    assert command == "run", command
    measure_from, measure_until = float(args[0]), float(args[1])
    step_s = setting.wall_s(setting.step_s(spec.index))
    compute_s = blocked_s = 0.0
    samples = steps = 0
    epoch_times: list[tuple[float, int]] = []
    epoch = optimizer.local_epoch
    start_epoch = end_epoch = None
    while (now := time.time()) < measure_until:
        if start_epoch is None and now >= measure_from:
            start_epoch = optimizer.local_epoch
        time.sleep(step_s)  # the simulated forward and backward pass
        computed = time.time()
        optimizer.step()
        stepped = time.time()
        if computed > measure_from:  # count only what falls inside the window
            compute_s += min(computed, measure_until) - max(computed - step_s, measure_from)
            blocked_s += max(min(stepped, measure_until) - max(computed, measure_from), 0.0)
            samples += setting.batch_size
            steps += 1
        if optimizer.local_epoch != epoch:
            epoch = optimizer.local_epoch
            epoch_times.append((stepped, epoch))
    end_epoch = optimizer.local_epoch
    window = measure_until - measure_from
    say(
        index=spec.index,
        speed=setting.speed(spec.index),
        utilisation=compute_s / window,
        blocked_fraction=blocked_s / window,
        samples=samples,
        steps=steps,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        epoch_times=epoch_times,
    )
    sys.stdin.readline()  # quit: every volunteer stops its optimizer at about the same time
    apply_pending_updates(optimizer)
    optimizer.shutdown()
    dht.shutdown()


def _forked_volunteer(spec: VolunteerSpec) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    run_volunteer(spec)


def preload_volunteer_modules() -> None:
    """Import what a volunteer runs, once, in the process that forks them (one torch thread each)."""
    for name, value in PEER_ENV.items():
        os.environ.setdefault(name, value)
    import hivemind  # noqa: F401
    import torch

    import dalle_together.swarm.optimizer  # noqa: F401

    torch.set_num_threads(1)


# --- the orchestrator ---------------------------------------------------------------------------


def _pss_mb(pid: int) -> float:
    """Proportional set size of process ``pid`` (pages it shares count in part), MB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_mb(tb, index: int) -> float:
    """Proportional set size of host ``index``'s processes, MB."""
    pids = subprocess.run(
        ["ip", "netns", "pids", tb.hosts[index].namespace], capture_output=True, text=True
    ).stdout
    return sum(_pss_mb(int(pid)) for pid in pids.split())


MIN_AVAILABLE_GB = 1.5
"""Stop the volunteers if the machine's available memory falls below this (others share it)."""


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def guard_memory(volunteers: list[PeerProcess], done: threading.Event) -> None:
    """Kill the volunteers (their hosts' other processes go when the testbed closes) before the
    machine runs out of memory: 16 volunteers of a 25M model are close to what 24 GB holds."""
    while not done.wait(1.0):
        if available_gb() < MIN_AVAILABLE_GB:
            print(f"less than {MIN_AVAILABLE_GB} GB of memory left: stopping", file=sys.stderr, flush=True)
            for v in list(volunteers):
                v.abandon()
            return


def measure(setting: Setting, logs: Path) -> dict[str, Any]:
    """Start the volunteers in a fresh testbed, train through a warm-up and a window, collect."""
    from benchmarks.testbed import Testbed

    n = setting.num_volunteers
    done = threading.Event()
    volunteers: list[PeerProcess] = []
    threading.Thread(target=guard_memory, args=(volunteers, done), daemon=True).start()

    def start(i: int, host, initial_peer: str | None) -> PeerProcess:
        spec = VolunteerSpec(index=i, setting=setting, address=host.address, initial_peer=initial_peer)
        # forked from this process, which has imported torch and hivemind: 16 volunteers share those
        # pages instead of holding ~280 MB each (see Host.fork)
        volunteer = PeerProcess.fork(
            host, partial(_forked_volunteer, spec), log=logs / f"n{n}-{setting.model_size}-v{i}.log"
        )
        volunteers.append(volunteer)
        return volunteer

    try:
        with Testbed(n, rate_mbit=setting.rate_mbit / setting.time_dilation) as tb:
            started = time.monotonic()
            start_peers(tb, start, timeout_s=300)
            for v in volunteers:
                v.answer(timeout_s=600)  # ready: the optimizer exists
            startup_s = time.monotonic() - started
            measure_from = time.time() + 1.0 + setting.wall_s(setting.warmup_s)
            measure_until = measure_from + setting.wall_s(setting.measure_s)
            for v in volunteers:
                v.send(f"run {measure_from} {measure_until}")
            time.sleep(max(measure_from - time.time(), 0.0))
            cpu_before = [tb.cpu_seconds(i) for i in range(n)]
            tx_before = [tb.tx_bytes(i) for i in range(n)]
            time.sleep(max(measure_until - time.time(), 0.0))
            cpu = [tb.cpu_seconds(i) - b for i, b in enumerate(cpu_before)]
            tx = [tb.tx_bytes(i) - b for i, b in enumerate(tx_before)]
            memory = [memory_mb(tb, i) for i in range(n)]
            orchestrator_mb = _pss_mb(os.getpid())  # holds its share of the pages the volunteers share
            results = [v.answer(timeout_s=setting.wall_s(setting.base_step_s) + 600) for v in volunteers]
            for v in volunteers:
                v.send("quit")
            for v in volunteers:
                with contextlib.suppress(subprocess.TimeoutExpired):  # the testbed kills what is left
                    v.proc.wait(60)
    finally:
        done.set()
    return summarise(
        setting, results, cpu=cpu, tx=tx, memory=memory, orchestrator_mb=orchestrator_mb, startup_s=startup_s
    )


def summarise(
    setting: Setting,
    results: list[dict[str, Any]],
    *,
    cpu: list[float],
    tx: list[int],
    memory: list[float],
    orchestrator_mb: float,
    startup_s: float,
) -> dict[str, Any]:
    window = setting.measure_s  # in the simulated swarm's time
    wall_window = setting.wall_s(window)
    utilisation = [r["utilisation"] for r in results]
    samples_per_s = sum(r["samples"] for r in results) / window
    epochs = statistics.median(r["end_epoch"] - r["start_epoch"] for r in results)
    # the epoch period from the transitions every volunteer saw inside the window
    periods = []
    for r in results:
        times = [t for t, _ in r["epoch_times"]]
        if len(times) >= 2:
            periods.append((times[-1] - times[0]) / (len(times) - 1) / setting.time_dilation)
    return {
        **asdict(setting),
        "target_batch_size": setting.target_batch_size,
        "ideal_samples_per_s": setting.ideal_samples_per_s,
        "mean_utilisation": statistics.mean(utilisation),
        "min_utilisation": min(utilisation),
        "utilisation_by_speed": {
            str(s): statistics.mean(u for r, u in zip(results, utilisation, strict=True) if r["speed"] == s)
            for s in sorted({r["speed"] for r in results})
        },
        "samples_per_s": samples_per_s,
        "samples_over_ideal": samples_per_s / setting.ideal_samples_per_s,
        "epochs_in_window": epochs,
        "epoch_period_s": statistics.median(periods) if periods else None,
        "stepped_samples_per_s": epochs * setting.target_batch_size / window,
        # cores of this machine (wall time): what says whether the 2 cores were the limit
        "cpu_cores_all_volunteers": sum(cpu) / wall_window,
        "cpu_cores_per_volunteer": statistics.mean(cpu) / wall_window,
        "sent_mbit_per_volunteer": statistics.mean(tx) * 8 / window / 1e6,
        "memory_mb_per_volunteer": statistics.mean(memory),
        "memory_gb_total": (sum(memory) + orchestrator_mb) / 1024,
        "startup_s": startup_s,
        "volunteers": results,
    }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        "| N | link Mbit/s | params | target batch (epoch s) | time dilation | mean util | min util "
        "| util 1x/2x/4x | samples/s / ideal | epoch period s | CPU cores (all) | sent Mbit/s/vol "
        "| RAM GB (all) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        by_speed = "/".join(f"{r['utilisation_by_speed'][s]:.0%}" for s in sorted(r["utilisation_by_speed"]))
        period = f"{r['epoch_period_s']:.1f}" if r["epoch_period_s"] else "-"
        lines.append(
            f"| {r['num_volunteers']} | {r['rate_mbit']:g} | {r['model_size']} "
            f"| {r['target_batch_size']} ({r['epoch_s']:g} s) | {r.get('time_dilation', 1.0):g}x "
            f"| **{r['mean_utilisation']:.1%}** "
            f"| {r['min_utilisation']:.1%} | {by_speed} "
            f"| {r['samples_per_s']:.0f} / {r['ideal_samples_per_s']:.0f} = {r['samples_over_ideal']:.2f} "
            f"| {period} | {r['cpu_cores_all_volunteers']:.2f} | {r['sent_mbit_per_volunteer']:.1f} "
            f"| {r['memory_gb_total']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cpu_ax = ax.twinx()  # why utilisation falls on one machine: the volunteers' CPU use
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in results:
        label = f"{r['model_size']}, {r['rate_mbit']:g} Mbit/s, {r['epoch_s']:g} s epochs"
        if r.get("time_dilation", 1.0) != 1.0:
            label += f", {r['time_dilation']:g}x time dilation"
        series.setdefault(label, []).append(
            (r["num_volunteers"], r["mean_utilisation"], r["cpu_cores_all_volunteers"])
        )
    for label, points in series.items():
        n, utilisation, cores = zip(*sorted(points), strict=True)
        line = ax.plot(n, utilisation, marker="o", label=label)[0]
        cpu_ax.plot(n, cores, marker="x", linestyle=":", color=line.get_color())
    ax.axhline(0.9, color="red", linestyle="--", linewidth=0.8, label="90% target")
    ax.plot([], [], "k:x", label="CPU cores the volunteers used (right axis)")
    ax.set(xlabel="volunteers N", ylabel="mean compute utilisation", ylim=(0, 1.02))
    cpu_ax.set(
        ylabel=f"CPU cores used (this machine has {os.cpu_count()})", ylim=(0, (os.cpu_count() or 2) * 1.02)
    )
    ax.set_xticks(sorted({r["num_volunteers"] for r in results}))
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Simulated compute, real hivemind averaging on capped links")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def settings_for(args: argparse.Namespace) -> list[Setting]:
    common = dict(base_step_s=args.base_step_s, batch_size=args.batch_size)
    if args.full:
        # at real speed the volunteers' communication saturates the 2 shared cores beyond 8 (each
        # would have its own machine): 16 run 4x dilated, with 8 and 12 also dilated to compare
        grid = (
            [(n, 100.0, "25M", 30.0, 1.0) for n in (4, 8, 12)]
            + [(n, 100.0, "25M", 30.0, 4.0) for n in (8, 12, 16)]
            + [
                (12, 10.0, "25M", 30.0, 1.0),
                (12, 100.0, "25M", 10.0, 1.0),
                (4, 100.0, "100M", 30.0, 1.0),
            ]
        )
    else:
        grid = [(4, 100.0, "25M", 30.0, 1.0)]
    if args.volunteers:
        grid = [(n, r, m, e, d) for n in args.volunteers for (_, r, m, e, d) in grid[:1]]
    if args.rate_mbit or args.model_size or args.epoch_seconds or args.time_dilation:
        grid = [
            (n, args.rate_mbit or r, args.model_size or m, args.epoch_seconds or e, args.time_dilation or d)
            for (n, r, m, e, d) in grid
        ]
    return [
        Setting(
            num_volunteers=n,
            rate_mbit=rate,
            model_size=size,
            epoch_s=epoch_s,
            warmup_s=args.warmup_epochs * epoch_s,
            measure_s=args.measure_epochs * epoch_s,
            time_dilation=dilation,
            **common,
        )  # fmt: skip
        for n, rate, size, epoch_s, dilation in dict.fromkeys(grid)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    setting = parser.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true", help="N=4, 25M, 100 Mbit/s, 30 s epochs (default)")
    setting.add_argument(
        "--full",
        action="store_true",
        help="N=4, 8, 12 at 25M/100 Mbit/s/30 s, and N=8, 12, 16 of it 4x dilated; N=12 at 10 Mbit/s; "
        "N=12 with 10 s epochs; N=4 at 100M",
    )
    parser.add_argument(
        "--volunteers", nargs="+", type=int, help="N values (with the first setting's others)"
    )
    parser.add_argument("--rate-mbit", type=float, help="override every setting's link rate")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), help="override every setting's model")
    parser.add_argument(
        "--epoch-seconds", type=float, help="override: seconds the group needs per target batch"
    )
    parser.add_argument(
        "--time-dilation",
        type=float,
        help="override: run the swarm this many times slower (links slower, steps, epochs and "
        "timeouts longer), so many volunteers' CPU fits this machine; results in real time",
    )
    parser.add_argument("--base-step-s", type=float, default=4.0, help="a 1x volunteer's step time")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per local step")
    parser.add_argument("--warmup-epochs", type=float, default=1.5)
    parser.add_argument("--measure-epochs", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, default=Path("runs/bench/bench_scaling.md"))
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/bench_scaling.png"))
    args = parser.parse_args()

    from benchmarks.testbed import cleanup_stale, testbed_available

    available, reason = testbed_available()
    if not available:
        sys.exit(f"bench_scaling needs the network testbed: {reason}")
    cleanup_stale()
    preload_volunteer_modules()
    command = "python -m benchmarks.bench_scaling " + " ".join(sys.argv[1:])
    results = []
    logs = args.markdown.parent / "bench_scaling-logs"  # each volunteer's stderr, for a failed run
    logs.mkdir(parents=True, exist_ok=True)
    for s in settings_for(args):
        print(f"measuring {s}", file=sys.stderr, flush=True)
        result = measure(s, logs)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "volunteers"}), flush=True)
    write_report(
        command=command, table=markdown(results, command), results=results, markdown=args.markdown,
        json_path=args.json, plot=plot, plot_path=args.plot,
    )  # fmt: skip


if __name__ == "__main__":
    main()
