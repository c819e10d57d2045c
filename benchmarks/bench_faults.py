"""Faults a collaboration must survive, on the testbed: what they cost and that nothing is lost.

    python -m benchmarks.bench_faults [--quick | --full] [--json F] [--markdown F]

A real ``dalle-together coordinator`` and real ``dalle-together join`` volunteers (tiny preset,
one torch thread each) run in testbed hosts on capped links. After a baseline, one fault at a time:

- ``kill``: SIGKILL a random volunteer (its DHT, averagers and p2p daemon at once) while it trains;
- ``link-down``: cut a volunteer's link for 10 s (``Testbed.link_down``), then restore it;
- ``straggler``: cap a volunteer's link at 1 Mbit/s for a while, then restore it;
- ``coordinator-restart``: SIGKILL the coordinator, start it again on the same directory.

For each: the time the others lost, ``(time to complete K epochs from the fault) - K x baseline
epoch period``, with K chosen to cover the fault and its recovery; and consistency: every survivor
keeps completing epochs, and the survivors' states agree. The states are downloaded from each
volunteer directly (hivemind's ``rpc_download_state``, the call a joiner makes) by a probe in its
own host; at the same epoch their parameters must differ by far less than one optimizer step
(``rms difference / lr``: a lost or doubled step shows as about 1, the rounding of fp16 averaging
as about 0.01). Volunteers on 2 shared cores are CPU-bound, so the swarm's throughput is about the
same with 2 or 3 of them, and a dip is the fault's own cost.
Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "testbed"
EPOCH_LINE = re.compile(r"^\S+ epoch (\d+) \|")
ADDRESS = re.compile(r"^/ip4/\S+/p2p/\S+$")
AGREE_OVER_LR = 0.75
"""Two peers agree if their parameters' rms difference is below this many learning rates: one
optimizer step lost or applied twice moves the weights by about 1 (AdamW, no warm-up); fp16
averaging's rounding by about 0.01. Measured on 20 Mbit/s links with 3 volunteers. With epochs of
~8 s and 2 s matchmaking (:class:`SwarmSettings`' defaults): mostly 0.003-0.011; 0.45-0.70 after a
half-done round or a straggler's gradients averaged into the next epoch's round; once one peer
1.38 from the other two (cause not seen). With epochs of 2-4 s and 1 s matchmaking (this module's
earlier settings): 0.1-0.6 at best, once 0.89, because peers whose transitions are over a second
apart are left out of rounds or get half-done ones (each peer keeps its own values for the parts
that did not arrive) until the next state averaging pulls them together. A peer that missed a round
entirely (it stepped with its own gradients) is about a step away until then, like a lost step:
0.75 is below that and above half-done rounds; :meth:`CliSwarm.probe_agreement` looks twice."""
COORDINATOR_PORT = 31337
"""A fixed port (the host is the coordinator's alone): restarted, it keeps the address the
volunteers know (its peer id persists in its directory), so they reconnect to it."""


# --- a swarm of CLI peers in a testbed ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SwarmSettings:
    """The run the coordinator starts: a run as designed, where a round's communication (1-2 s for
    the gradients at 20 Mbit/s, 4 s for a state download) fits in an epoch of about 8 s (3 volunteers
    of ~30 samples/s on 2 shared cores), with the tiny preset's matchmaking time. With epochs of 2-4 s
    and a 1 s matchmaking time volunteers also train together, but peers whose transitions are more
    than the matchmaking time apart are left out of rounds (hivemind's sender timeout): the faults'
    effects drown in that."""

    target_batch_size: int = 768
    batch_size: int = 16
    matchmaking_time_s: float = 2.0
    lr: float = 1e-3
    warmup_steps: int = 0
    """No warm-up: every step moves the weights by about ``lr`` (Adam), which the agreement check uses."""


class CliSwarm:
    """A coordinator on host 0, volunteers on hosts 1.., and a probe host (the last) in ``tb``.

    :param tokenizers: a directory holding a trained text tokenizer and VQ-VAE of the tiny preset;
      ``None``: the coordinator trains them (for a short time) in ``run_dir``.
    """

    def __init__(
        self,
        tb,
        run_dir: Path,
        *,
        settings: SwarmSettings,
        tokenizers: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.tb, self.run_dir, self.settings, self.echo = tb, run_dir, settings, echo
        self.probe_host = tb.hosts[-1]
        self.volunteer_hosts = tb.hosts[1:-1]
        run_dir.mkdir(parents=True, exist_ok=True)
        if tokenizers is not None:
            for name in ("text_tokenizer.json", "vqvae.safetensors", "vqvae.json"):
                (run_dir / name).write_bytes((tokenizers / name).read_bytes())
        self.coordinator = None
        self.address = ""
        self.volunteers: dict[int, Any] = {}

    def start_coordinator(self, timeout_s: float = 180.0) -> str:
        s = self.settings
        host = self.tb.hosts[0]
        self.coordinator = host.cli(
            "coordinator",
            [
                "coordinator", "--run-id", RUN_ID, "--checkpoint-dir", str(self.run_dir), "--preset", "tiny",
                "--host-maddrs", f"/ip4/{host.address}/tcp/{COORDINATOR_PORT}", "--target-batch-size", str(s.target_batch_size),
                "--matchmaking-time", str(s.matchmaking_time_s), "--lr", str(s.lr),
                "--warmup-steps", str(s.warmup_steps), "--checkpoint-every-epochs", "5",
                "--tokenizer-minutes", "0.2", "--status-every", "2",
            ],
            echo=self.echo,
        )  # fmt: skip
        self.address = self.coordinator.wait_for_stdout(ADDRESS, timeout_s=timeout_s)
        return self.address

    def start_volunteer(self, index: int) -> None:
        """Start ``dalle-together join`` on volunteer host ``index`` (0-based among volunteers)."""
        host = self.volunteer_hosts[index]
        self.volunteers[index] = host.cli(
            f"v{index}",
            [
                "join", "--initial-peers", self.address, "--run-id", RUN_ID, "--name", f"v{index}",
                "--batch-size", str(self.settings.batch_size), "--threads", "1",
                "--host-maddrs", host.maddr, "--cache-dir", str(self.run_dir.parent / f"cache-v{index}"),
                "--report-every", "1",
            ],
            echo=self.echo,
        )  # fmt: skip

    def epoch_history(self, index: int) -> list[tuple[float, int]]:
        """(monotonic time, epoch) of each progress line volunteer ``index`` printed."""
        return [
            (t, int(m.group(1))) for t, line in self.volunteers[index].stderr if (m := EPOCH_LINE.match(line))
        ]

    def epoch(self, index: int) -> int:
        history = self.epoch_history(index)
        return history[-1][1] if history else -1

    def joined(self, index: int) -> bool:
        return any("joined run" in line for _, line in self.volunteers[index].stderr)

    def alive(self) -> list[int]:
        return [i for i, v in self.volunteers.items() if v.proc.poll() is None]

    def log(self, index: int | None = None) -> str:
        peer = self.coordinator if index is None else self.volunteers[index]
        return "\n".join(line for _, line in peer.stderr)

    def wait(self, condition, timeout_s: float, what: str) -> float:
        """Poll ``condition`` until true; the seconds it took. Raises with the logs on timeout."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                logs = "\n\n".join(f"--- v{i}\n{self.log(i)[-3000:]}" for i in self.volunteers)
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}\n{logs}")
            time.sleep(0.2)
        return time.monotonic() - started

    def time_of_epoch(self, index: int, epoch: int) -> float | None:
        """When volunteer ``index`` first reported ``epoch`` or later (monotonic), or None."""
        return next((t for t, e in self.epoch_history(index) if e >= epoch), None)

    def peer_ids(self) -> dict[int, str]:
        """Volunteer index -> its peer id, from the line it printed on joining."""
        ids = {}
        for i, v in self.volunteers.items():
            for _, line in v.stderr:
                if m := re.search(r"joined run .* as (\S+):", line):
                    ids[i] = m.group(1)
        return ids

    def probe(self, indices: Sequence[int], *, rounds: int = 20, timeout_s: float = 150.0) -> dict[str, Any]:
        """Download the state of volunteers ``indices`` at once, up to ``rounds`` times; see :func:`run_probe`."""
        ids = self.peer_ids()
        spec = {
            "initial_peer": self.address,
            "address": self.probe_host.address,
            "peers": {f"v{i}": ids[i] for i in indices},
            "rounds": rounds,
            "interval_s": 0.5,
            # stop early enough to print what it saw: starting the probe's DHT takes seconds
            "budget_s": max(timeout_s - 40.0, 10.0),
        }
        result = self.probe_host.run(
            [sys.executable, "-m", "benchmarks.bench_faults", "--probe", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT,
            env={**_child_env()},
        )  # fmt: skip
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            raise RuntimeError(f"the state probe failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return json.loads(lines[-1])

    def probe_agreement(self, indices: Sequence[int], *, attempts: int = 2) -> dict[str, Any]:
        """:meth:`probe`, again (up to ``attempts`` times) while the volunteers never showed the same
        epoch or disagreed: a volunteer that missed a round (it stepped alone, or reloads the state)
        is a step apart, or at another epoch, until the next state averaging. The last probe's
        result, with ``attempts`` (how many were made)."""
        made = 0
        while True:
            probe, made = self.probe(indices), made + 1
            same = probe["same_epoch"]
            agree = same is not None and max(same["rms_diff_over_lr"].values(), default=0.0) < AGREE_OVER_LR
            if agree or made >= attempts:
                return {**probe, "attempts": made}

    def stop_volunteers(self, indices: Sequence[int], timeout_s: float = 60.0) -> dict[int, int]:
        """Ask volunteers ``indices`` to leave, all at once (one SIGTERM each: they apply pending
        updates, withdraw and shut down); their exit statuses. SIGKILL whoever outlives ``timeout_s``."""
        for i in indices:
            if self.volunteers[i].proc.poll() is None:
                self.volunteers[i].proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        statuses = {}
        for i in indices:
            proc = self.volunteers[i].proc
            try:
                statuses[i] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.volunteers[i].kill()
                statuses[i] = proc.returncode
        return statuses


def _child_env() -> dict[str, str]:
    from dalle_together.demo import CHILD_ENV

    return dict(CHILD_ENV)


# --- the probe (runs in its own testbed host) ----------------------------------------------------


def run_probe(spec: dict[str, Any]) -> None:
    """Download the state of each peer in ``spec["peers"]`` concurrently, up to ``spec["rounds"]``
    times (``spec["interval_s"]`` apart); print one JSON line: every round's epochs (and, where all
    peers reported the same epoch, the largest rms difference between two peers' parameters in units
    of the learning rate at that epoch, and the tensor that differs most), and in ``same_epoch`` the
    best such round. Stops at the first round in which the peers agree to within ``AGREE_OVER_LR``.

    Rounds exist because a peer's state is ambiguous for a moment after each epoch begins: its epoch
    number moves at once, its weights when the delayed optimizer step ends (after the gradients are
    averaged), a second or so later; two peers caught on either side of their step differ by about
    one step, about ``lr`` (AdamW). Downloads are fp16 (the run's state compression), so two equal
    fp32 weights arrive equal and an rms difference far below ``lr`` means the same weights.
    """
    import torch
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.optim.state_averager import TrainingStateAverager
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.streaming import combine_from_streaming

    from dalle_together.optim import lr_multiplier
    from dalle_together.swarm.definition import fetch_definition
    from dalle_together.swarm.dht import configure_hivemind_logging, start_dht
    from dalle_together.swarm.optimizer import default_param_groups
    from dalle_together.swarm.records import run_validators
    from dalle_together.train import build_model

    configure_hivemind_logging(verbose=False)
    dht = start_dht(
        initial_peers=[spec["initial_peer"]],
        host_maddrs=[f"/ip4/{spec['address']}/tcp/0"],
        record_validators=run_validators(RUN_ID),
    )
    cfg = fetch_definition(dht, RUN_ID, timeout_s=30).config  # the run's own config
    model = build_model(cfg)
    # the state lists parameters in the optimizer's order (its parameter groups), then its moments
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = default_param_groups(model, cfg.optim)
    names = [name_of[id(p)] for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]

    def combine(parts: list) -> torch.Tensor:
        # the first part of each tensor says how many there are: a stream cut short (a peer's
        # stream can end early under load) must not pass for a state
        if len(parts) != parts[0].chunks:
            raise ConnectionError(f"a tensor arrived in {len(parts)} of {parts[0].chunks} parts")
        return deserialize_torch_tensor(combine_from_streaming(parts))

    async def download(p2p, peer: str) -> tuple[int, list[torch.Tensor]]:
        # the handler is registered under the serving class's name
        stub = TrainingStateAverager.get_stub(
            p2p, PeerID.from_base58(peer), namespace=f"{RUN_ID}_state_averager"
        )
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, parts, tensors = None, [], []
        async for message in stream:  # as hivemind's own load_state_from_peers reads it
            if message.metadata:
                metadata = MSGPackSerializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:
                tensors.append(combine(parts))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(combine(parts))
        if metadata is None or len(tensors) < len(names):
            raise ConnectionError(f"the state arrived incomplete ({len(tensors)} tensors)")
        return metadata["epoch"], [t.float() for t in tensors[: len(names)]]

    def compare(got: dict[str, tuple[int, list[torch.Tensor]]], epoch: int) -> dict[str, Any]:
        lr = cfg.optim.lr * lr_multiplier(max(epoch - 1, 0), cfg.optim)
        diffs, worst = {}, (0.0, "")
        peers = list(got)
        for i, a in enumerate(peers):
            for b in peers[i + 1 :]:
                pairs = list(zip(got[a][1], got[b][1], strict=True))
                total = sum(float((x - y).pow(2).sum()) for x, y in pairs)
                diffs[f"{a}-{b}"] = math.sqrt(total / sum(x.numel() for x, _ in pairs)) / lr
                for (x, y), name in zip(pairs, names, strict=True):
                    worst = max(worst, (float((x - y).pow(2).mean().sqrt()) / lr, name))
        return {"epoch": epoch, "rms_diff_over_lr": diffs, "worst_tensor": worst[1]}

    async def main() -> dict[str, Any]:
        p2p = await dht.replicate_p2p()
        names_ = list(spec["peers"])
        rounds, best = [], None
        deadline = time.monotonic() + spec.get("budget_s", math.inf)
        for r in range(spec["rounds"]):
            remaining = deadline - time.monotonic()
            if remaining <= 1.0:
                break
            got = await asyncio.gather(
                *(asyncio.wait_for(download(p2p, spec["peers"][n]), min(60.0, remaining)) for n in names_),
                return_exceptions=True,
            )
            failed = {n: repr(g) for n, g in zip(names_, got, strict=True) if isinstance(g, BaseException)}
            if failed:  # try again next round
                rounds.append({"failed": failed})
                await asyncio.sleep(spec.get("interval_s", 0.5))
                continue
            by_peer = dict(zip(names_, got, strict=True))
            epochs = {n: e for n, (e, _) in by_peer.items()}
            row: dict[str, Any] = {"epochs": epochs}
            if len(set(epochs.values())) == 1:
                result = {**compare(by_peer, next(iter(epochs.values()))), "round": r}
                row["max_rms_diff_over_lr"] = max(result["rms_diff_over_lr"].values(), default=0.0)
                if best is None or row["max_rms_diff_over_lr"] < max(
                    best["rms_diff_over_lr"].values(), default=0.0
                ):
                    best = result
                if row["max_rms_diff_over_lr"] < AGREE_OVER_LR:
                    rounds.append(row)
                    break
            rounds.append(row)
            await asyncio.sleep(spec.get("interval_s", 0.5))
        return {"rounds": rounds, "same_epoch": best}

    try:
        print(json.dumps(asyncio.run(main())), flush=True)
    finally:
        dht.shutdown()


# --- the faults ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FaultResult:
    fault: str
    victim: str
    epoch_at_fault: int
    epochs_measured: int
    seconds: float
    baseline_period_s: float
    lost_s: float
    survivors_advanced: bool
    same_epoch: int | None
    max_rms_diff_over_lr: float | None
    probes: int
    """How many times the survivors' states were downloaded (a second look follows a disagreement)."""
    consistent: bool
    survivor_epochs: dict[str, int]


def baseline_period(swarm: CliSwarm, indices: Sequence[int], seconds: float) -> float:
    """Seconds per epoch over the last ``seconds``, from the first volunteer's progress lines."""
    start_epoch = swarm.epoch(indices[0])
    swarm.wait(lambda: swarm.epoch(indices[0]) >= start_epoch + 1, 120, "an epoch")
    t0, e0 = time.monotonic(), swarm.epoch(indices[0])
    time.sleep(seconds)
    swarm.wait(lambda: swarm.epoch(indices[0]) >= e0 + 2, 120, "two epochs")
    e1 = swarm.epoch(indices[0])
    t_e0, t_e1 = swarm.time_of_epoch(indices[0], e0), swarm.time_of_epoch(indices[0], e1)
    return (
        (t_e1 - t_e0) / (e1 - e0) if t_e0 and t_e1 and e1 > e0 else (time.monotonic() - t0) / max(e1 - e0, 1)
    )


def run_fault(
    swarm: CliSwarm, fault: str, *, period_s: float, straggler_s: float, rng: random.Random
) -> FaultResult:
    """Inflict ``fault``, wait until the survivors have done enough epochs, check their states."""
    alive = swarm.alive()
    victim = rng.choice(alive)
    survivors = [i for i in alive if i != victim] if fault == "kill" else alive
    watcher = survivors[0] if fault != "link-down" else next(i for i in survivors if i != victim)
    epoch0, t0 = swarm.epoch(watcher), time.monotonic()
    disruption_s = {"kill": 0.0, "link-down": 10.0, "straggler": straggler_s, "coordinator-restart": 0.0}[
        fault
    ]
    if fault == "kill":
        swarm.volunteers[victim].kill()
    elif fault == "link-down":
        swarm.tb.link_down(swarm.volunteer_hosts[victim].index)
        time.sleep(10.0)
        swarm.tb.link_up(swarm.volunteer_hosts[victim].index)
    elif fault == "straggler":
        host = swarm.volunteer_hosts[victim].index
        rate = swarm.tb.rates_mbit[host]
        swarm.tb.set_rate(host, 1.0)
        time.sleep(straggler_s)
        swarm.tb.set_rate(host, rate)
    elif fault == "coordinator-restart":
        swarm.coordinator.kill()
        swarm.start_coordinator()
    # K epochs: those the fault spans, plus 5 to see the recovery
    k = math.ceil(disruption_s / period_s) + 5
    swarm.wait(
        lambda: swarm.epoch(watcher) >= epoch0 + k, 60 + 10 * k * period_s, f"{k} epochs after {fault}"
    )
    seconds = swarm.time_of_epoch(watcher, epoch0 + k) - t0
    # every survivor moves on (a volunteer cut off for 10 s may reload the state first)
    target = epoch0 + k - 1
    advanced = True
    try:
        swarm.wait(lambda: all(swarm.epoch(i) >= target for i in survivors), 90, "every survivor to catch up")
    except TimeoutError:
        advanced = False
    probe = swarm.probe_agreement(survivors)
    same = probe["same_epoch"]
    max_diff = max(same["rms_diff_over_lr"].values(), default=0.0) if same else None
    if max_diff is None or max_diff >= AGREE_OVER_LR:  # what the probe saw, to tell why
        print(f"{fault}: the last probe's rounds: {json.dumps(probe['rounds'])}", file=sys.stderr, flush=True)
    return FaultResult(
        fault=fault,
        victim="coordinator" if fault == "coordinator-restart" else f"v{victim}",
        epoch_at_fault=epoch0,
        epochs_measured=k,
        seconds=seconds,
        baseline_period_s=period_s,
        lost_s=seconds - k * period_s,
        survivors_advanced=advanced,
        same_epoch=same["epoch"] if same else None,
        max_rms_diff_over_lr=max_diff,
        probes=probe["attempts"],
        consistent=advanced and max_diff is not None and max_diff < AGREE_OVER_LR,
        survivor_epochs={f"v{i}": swarm.epoch(i) for i in survivors},
    )


FAULTS = ("kill", "link-down", "straggler", "coordinator-restart")


def markdown(results: list[FaultResult], *, command: str, header: str) -> str:
    lines = [
        f"`{command}`",
        "",
        header,
        "",
        "| fault | victim | epochs measured | took s | baseline s | time lost s | survivors advanced "
        "| state agreement (rms diff / lr, same epoch) | consistent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agreement = (
            f"{r.max_rms_diff_over_lr:.3f} at epoch {r.same_epoch}"
            + (f" (look {r.probes})" if r.probes > 1 else "")
            if r.max_rms_diff_over_lr is not None
            else "-"
        )
        lines.append(
            f"| {r.fault} | {r.victim} | {r.epochs_measured} (from {r.epoch_at_fault}) | {r.seconds:.1f} "
            f"| {r.epochs_measured * r.baseline_period_s:.1f} | **{r.lost_s:.1f}** "
            f"| {'yes' if r.survivors_advanced else 'NO'} | {agreement} | {'yes' if r.consistent else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: download and compare states
    setting = parser.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true", help="3 volunteers, each fault once (default)")
    setting.add_argument("--full", action="store_true", help="4 volunteers, longer baseline and straggler")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--rate-mbit", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--echo", action="store_true", help="copy the peers' output to stderr")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, default=Path("runs/bench/bench_faults.md"))
    args = parser.parse_args()
    if args.probe:
        return run_probe(json.loads(args.probe))

    from benchmarks.testbed import Testbed, cleanup_stale, testbed_available

    available, reason = testbed_available()
    if not available:
        sys.exit(f"bench_faults needs the network testbed: {reason}")
    cleanup_stale()
    num_volunteers = 4 if args.full else 3
    # about 5 epochs: over 2 (15 s) the baseline moved by a second an epoch from one fault to the next
    baseline_s = 60.0 if args.full else 40.0
    straggler_s = 30.0 if args.full else 15.0
    # a kill and a restart remove volunteers: start one spare per fault that removes one
    spares = sum(f == "kill" for f in args.faults)
    total = num_volunteers + spares
    command = "python -m benchmarks.bench_faults " + " ".join(sys.argv[1:])
    rng = random.Random(args.seed)
    settings = SwarmSettings()
    run_dir = args.markdown.parent / "bench_faults-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no checkpoint to resume from
    results: list[FaultResult] = []
    # the probe's host gets a fast link: downloading every state at once must not take an epoch
    with Testbed(total + 2, rate_mbit=args.rate_mbit, rates={total + 1: 1000.0}) as tb:
        swarm = CliSwarm(tb, run_dir / "coordinator", settings=settings, echo=args.echo)
        swarm.start_coordinator(timeout_s=300)
        for i in range(num_volunteers):
            swarm.start_volunteer(i)
        swarm.wait(lambda: all(swarm.epoch(i) >= 3 for i in range(num_volunteers)), 300, "three epochs")
        spare = num_volunteers
        for fault in args.faults:
            period = baseline_period(swarm, swarm.alive(), baseline_s)
            print(f"{fault}: baseline {period:.2f} s per epoch", file=sys.stderr, flush=True)
            result = run_fault(swarm, fault, period_s=period, straggler_s=straggler_s, rng=rng)
            results.append(result)
            print(json.dumps(result.__dict__), flush=True)
            if fault == "kill":  # a replacement joins, so every fault sees the same swarm size
                swarm.start_volunteer(spare)
                swarm.wait(lambda s=spare: swarm.epoch(s) >= 0, 180, "the replacement to join")
                spare += 1
    header = (
        f"{num_volunteers} volunteers (`dalle-together join`, tiny preset, batch {settings.batch_size}, "
        f"1 thread each) and a coordinator on {args.rate_mbit:g} Mbit/s links, target batch "
        f"{settings.target_batch_size}, 2 shared CPU cores"
    )
    write_report(
        command=command,
        table=markdown(results, command=command, header=header),
        results=[r.__dict__ for r in results],
        markdown=args.markdown,
        json_path=args.json,
    )
    if not all(r.consistent for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
