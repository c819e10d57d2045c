"""``make demo``: a coordinator and two volunteers train the tiny model together on loopback.

One command shows the whole collaboration on one machine: it runs the real ``dalle-together``
commands as subprocesses (one torch thread each) — a coordinator that trains the tokenizers and
starts the run, and two volunteers that join it and train the same model — each stepping after
every local batch, the two averaging their parameters every two epochs (``--no-local-updates``:
averaging gradients into one step per epoch) — then asks ``status`` who contributed what, stops
everything, and draws a grid of fixed prompts from the coordinator's checkpoint. Every child is
stopped on exit and on Ctrl-C.

    python -m dalle_together.demo --out runs/demo [--minutes 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dalle_together.processes import kill_tree

DEMO_PROMPTS = [
    "a large red circle in the center",
    "a small blue triangle in the top left",
    "a large yellow square in the bottom right",
    "a small cyan circle in the top right",
    "a large magenta triangle in the bottom left",
    "a small orange square in the center",
]
RUN_ID = "demo"
ADDRESS = re.compile(r"^/(ip4|ip6|dns4|dns6|dns)/\S+/p2p/\S+$")
CHILD_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONUNBUFFERED": "1",
}


class CliProcess:
    """One ``dalle-together`` command running as a child: its output lines, timestamped, and a clean stop.

    The child runs in its own session, so a Ctrl-C in the terminal reaches only this process, which
    then stops its children in order (a SIGTERM each: they leave the swarm cleanly).
    ``kill`` simulates a machine that vanishes: the child and all its processes die at once.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        echo: bool = True,
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """:param cpus: run the child (and every process it starts) on these CPUs only.
        :param env: environment variables to set on top of :data:`CHILD_ENV`."""
        self.name, self.args, self.echo = name, list(args), echo
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.proc = self._start(
            [sys.executable, "-m", "dalle_together.cli", *self.args],
            env={**CHILD_ENV, **(env or {})},
            cpus=cpus,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _start(self, argv: list[str], *, env: dict[str, str], cpus: set[int] | None) -> subprocess.Popen:
        """Start the command with piped text output (a subclass may start it elsewhere)."""
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream, into: list[tuple[float, str]]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self._changed:
                into.append((time.monotonic(), line))
                self._changed.notify_all()
            if self.echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
        with self._changed:
            self._changed.notify_all()

    def wait_for_stdout(self, pattern: re.Pattern[str], timeout_s: float) -> str:
        """The first stdout line matching ``pattern``; raises if the child exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for _, line in self.stdout:
                    if pattern.match(line):
                        return line
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} printed no line matching {pattern.pattern!r}")
                self._changed.wait(min(left, 1.0))

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL (the child's whole session) if it does not leave in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        for reader in self._readers:
            reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the child and all its descendants at once (its DHT, averagers and p2p daemon)."""
        kill_tree(self.proc.pid)
        self.proc.wait()


def start(*args: str) -> subprocess.Popen:
    """Start a short ``dalle-together`` command; its stdout is piped, its stderr is the demo's."""
    print("$ dalle-together " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.Popen(
        [sys.executable, "-m", "dalle_together.cli", *args], stdout=subprocess.PIPE, text=True, env=CHILD_ENV
    )


def finish(command: subprocess.Popen, *, required: bool = True, timeout_s: float | None = None) -> str | None:
    """Wait for a command :func:`start` started; its stdout. If it fails (or outlives ``timeout_s``):
    exit with its status, or return None if it is not ``required`` (it has printed why)."""
    try:
        stdout, _ = command.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(command.pid)  # its DHT and p2p daemon hold the output pipe open too
        stdout, _ = command.communicate()
        print(f"dalle-together {command.args[3]} did not finish in time; stopped it", file=sys.stderr)
        if required:
            sys.exit(1)
        return None
    if command.returncode:
        if required:
            sys.exit(command.returncode)
        return None
    return stdout


def run(*args: str, required: bool = True) -> str | None:
    """Run a short ``dalle-together`` command to completion; its stdout (see :func:`finish`)."""
    return finish(start(*args), required=required)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--minutes", type=float, default=5.0, help="collaborative training time")
    parser.add_argument("--tokenizer-minutes", type=float, default=1.5, help="image tokenizer training time")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per local step of each volunteer")
    parser.add_argument(
        "--local-updates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each volunteer steps after every local batch, parameters averaged every few epochs "
        "(default); --no-local-updates averages gradients into one step per epoch, as the seed did",
    )
    parser.add_argument(
        "--target-batch-size",
        type=int,
        help="samples per epoch, both volunteers together (default: 128 with local updates, 96 without)",
    )
    parser.add_argument(
        "--lr", type=float, help="peak learning rate (default: 2e-3 with local updates, 6e-3 without)"
    )
    parser.add_argument(
        "--delayed-updates",
        action="store_true",
        help="with --no-local-updates: apply each epoch's update in the background, during the next "
        "(the seed's choice for slow links)",
    )
    parser.add_argument("--warmup-steps", type=int, default=40, help="learning-rate warm-up, in epochs")
    parser.add_argument(
        "--total-steps",
        type=int,
        default=None,
        help="cosine schedule length, in epochs (default: fitted to --minutes at the volunteers' measured pace)",
    )
    parser.add_argument("--matchmaking-time", type=float, default=0.3, help="seconds to form a group")
    parser.add_argument(
        "--next-chunk-timeout",
        type=float,
        default=0.5,
        help="seconds a peer may be late in an averaging round before it is left out",
    )
    parser.add_argument("--checkpoint-every-epochs", type=int, default=100)
    parser.add_argument(
        "--average-state-every",
        type=int,
        help="epochs between parameter averaging rounds (default: 2 with local updates, 5 without)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="volunteers log every averaging round and epoch (hivemind's log)",
    )
    args = parser.parse_args()
    if args.local_updates and args.delayed_updates:
        parser.error("--delayed-updates needs --no-local-updates (local updates are applied at once)")
    for name, local, averaged in (
        ("target_batch_size", 128, 96),
        ("lr", 2e-3, 6e-3),
        ("average_state_every", 2, 5),
    ):
        if getattr(args, name) is None:
            setattr(args, name, local if args.local_updates else averaged)

    # A 5-minute demo wants many optimizer steps. With local updates each volunteer steps after
    # every 16 samples and the two average parameters every 2 epochs of 128 (~1.6 s): in the same
    # wall time that reached the faithfulness of `train` on both cores, on average over five pairs,
    # which gradient averaging (every epoch waits for a gradient round) did not (BENCHMARKS.md).
    # Its peak learning rate is a local step's: 3e-3 reached a lower loss than 2e-3 but lost
    # hold-out colour (new colour-shape pairs).
    # Without local updates (the seed's way), as measured before:
    # a global batch of 96 (an epoch every ~0.75 s) and
    # 0.3 s of matchmaking, plenty on loopback (over the Internet, keep the preset's seconds and a
    # bigger batch). Measured on this data (BENCHMARKS.md): a peak learning rate of 6e-3 learns far
    # more than 2e-3; 96-sample steps learn more from the same samples than 128-sample ones, which
    # outweighs the few percent fewer samples the volunteers process with more frequent averaging;
    # and updates applied at once beat delayed ones, which on epochs this short make the first
    # local steps of each epoch compute on stale parameters (the volunteers then wait ~20% of the
    # time for averaging instead of ~5%, and reach a loss of 1.4 instead of 1.9 in as many steps).
    #
    # With 0.5 s of matchmaking an epoch that ended early sometimes found its round still forming a
    # group; the next round then queued behind it, the volunteers' rounds fell out of step and, for
    # a minute or so, many rounds were half done. Peers trigger a round up to a local step (~0.2 s)
    # apart: the next-chunk timeout stays at 0.5 s, not the matchmaking time as hivemind would make it.
    coordinator_dir = args.out / "coordinator"
    children: list[CliProcess] = []
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        coordinator = CliProcess(
            "coordinator",
            [
                "coordinator",
                "--run-id", RUN_ID,
                "--checkpoint-dir", str(coordinator_dir),
                "--preset", "tiny",
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                "--target-batch-size", str(args.target_batch_size),
                "--warmup-steps", str(args.warmup_steps),
                *(["--total-steps", str(args.total_steps)] if args.total_steps
                  else ["--schedule-minutes", str(args.minutes)]),
                "--lr", str(args.lr),
                "--local-updates" if args.local_updates else "--no-local-updates",
                *([] if args.local_updates else
                  ["--delayed-updates" if args.delayed_updates else "--no-delayed-updates"]),
                "--matchmaking-time", str(args.matchmaking_time),
                "--next-chunk-timeout", str(args.next_chunk_timeout),
                "--checkpoint-every-epochs", str(args.checkpoint_every_epochs),
                "--average-state-every", str(args.average_state_every),
                "--tokenizer-minutes", str(args.tokenizer_minutes),
                "--status-every", "20",
            ],
            # it trains the image tokenizer before anyone joins: give it every core
            env={"OMP_NUM_THREADS": str(os.cpu_count() or 1), "MKL_NUM_THREADS": str(os.cpu_count() or 1)},
        )  # fmt: skip
        children.append(coordinator)
        address = coordinator.wait_for_stdout(ADDRESS, timeout_s=args.tokenizer_minutes * 60 + 300)
        # the coordinator fits the learning-rate schedule to end --minutes from now: stop it then
        deadline = time.monotonic() + args.minutes * 60
        volunteers = []
        for i in (1, 2):
            volunteers.append(
                CliProcess(
                    f"volunteer-{i}",
                    [
                        "join",
                        "--initial-peers",
                        address,
                        "--run-id",
                        RUN_ID,
                        "--name",
                        f"volunteer-{i}",
                        "--batch-size",
                        str(args.batch_size),
                        "--threads",
                        "1",
                        "--host-maddrs",
                        "/ip4/127.0.0.1/tcp/0",
                        "--cache-dir",
                        str(args.out / f"volunteer-{i}"),
                        "--report-every",
                        "20",
                        *(["--verbose"] if args.verbose else []),
                    ],
                )  # fmt: skip
            )
            children.append(volunteers[-1])
        # the summary's who-contributed-what (the checkpoint and its evaluation do not depend on
        # it), asked for ahead of the deadline: `status` takes 10-20 s to start a peer here
        time.sleep(max(deadline - STATUS_LEAD_S - time.monotonic(), 0.0))
        status_command = start("status", "--initial-peers", address, "--run-id", RUN_ID, "--json")
        time.sleep(max(deadline - time.monotonic(), 0.0))
        status = finish(status_command, required=False, timeout_s=STATUS_LEAD_S)
        summary = json.loads(status) if status is not None else None
        # the coordinator saves the swarm's latest state on its way out, so stop it while volunteers train
        coordinator.stop(timeout_s=180)
        for volunteer in volunteers:
            volunteer.stop()
    except KeyboardInterrupt:
        interrupted = True
        print("demo interrupted: stopping every peer", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for child in reversed(children):
            if child.proc.poll() is None:
                child.stop(timeout_s=30)
    if interrupted:
        sys.exit(130)

    paths = run(
        "generate",
        "--checkpoint", str(coordinator_dir),
        "--out", str(args.out / "samples"),
        "--num-images", "4",
        "--seed", "0",
        *DEMO_PROMPTS,
    ).split()  # fmt: skip
    evaluation = json.loads(
        run("evaluate", "--checkpoint", str(coordinator_dir), "--num-captions", "24", "--json")
    )
    _print_summary(summary, evaluation, grid=paths[-1], local_updates=args.local_updates)


STATUS_LEAD_S = 20.0
"""``status`` is started this long before the end of the training time, so that it has read the
run when the coordinator stops, on time (measured: 14-19 s from start to answer on 2 busy cores)."""


def _print_summary(status: dict | None, evaluation: dict, *, grid: str, local_updates: bool) -> None:
    print()
    if status is None:
        print("collaborative run: its status could not be read (see above)")
    else:
        _print_contributions(status, local_updates=local_updates)
    state = json.loads((Path(evaluation["checkpoint"]) / "state.json").read_text())
    print(
        f"checkpoint: epoch {evaluation['step']} of a {state['schedule_total_steps']}-epoch "
        f"learning-rate schedule, in {evaluation['checkpoint']}"
    )
    for split in ("seen", "holdout"):
        row = evaluation[split]
        scores = ", ".join(f"{a} {row[a]:.0%}" for a in ("color", "shape", "position", "size"))
        print(f"faithfulness on {split} captions ({row['n']}): {scores}")
    print(f"grid of {len(DEMO_PROMPTS)} prompts x 4 images: {grid}")


def _print_contributions(status: dict, *, local_updates: bool) -> None:
    if local_updates:
        print(f"collaborative run {status['run_id']!r}: {status['epoch']} epochs of {status['target_batch_size']} "
              "samples (each volunteer stepped after every local batch; parameters averaged)")  # fmt: skip
    else:
        print(f"collaborative run {status['run_id']!r}: {status['epoch']} optimizer steps (epochs) of "
              f"{status['target_batch_size']} samples")  # fmt: skip
    for peer in status["peers"]:
        loss = f"{peer['loss']:.3f}" if peer["loss"] is not None else "-"
        print(
            f"  {peer['name'] or peer['peer_id']}: {peer['samples_total']} samples contributed, "
            f"{peer['samples_per_second']:.1f} samples/s, loss {loss}"
        )
    contributed = sum(peer["samples_total"] for peer in status["peers"])
    if contributed and not local_updates:
        # samples past the target batch (peers learn of each other's progress with a delay) are
        # averaged in, but make no extra optimizer step
        stepped = status["epoch"] * status["target_batch_size"]
        print(f"  {contributed} samples contributed for {stepped} samples of optimizer steps "
              f"({min(stepped / contributed, 1.0):.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
