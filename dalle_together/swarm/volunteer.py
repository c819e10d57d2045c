"""A volunteer: join a run, train with everybody else, leave cleanly.

``dalle-together join`` runs :func:`run_volunteer`. It

1. starts a DHT peer connected to the initial peers (client mode behind NAT);
2. fetches the run's definition, checks the volunteer's own options against it, and downloads
   the tokenizer files from the coordinator (size and sha256 checked);
3. builds the model, wraps its optimizer in ``hivemind.Optimizer`` (the run's global target batch,
   this peer's batch per step, delayed updates) and downloads the swarm's current model and
   optimizer state; follows the schedule length the coordinator publishes (:mod:`.schedule`);
4. trains with ``train.local_step`` on its own data stream (the worker index comes from the peer
   id, so volunteers never draw the same samples), publishing its metrics every few seconds;
5. stops when ``stop`` is set or its step/time budget is spent: withdraws its metrics and shuts
   the optimizer and the DHT down, so the others stop counting on it at once.

Peers that vanish mid-round are hivemind's business: a failed all-reduce falls back to local
gradients, and the progress of a peer that stopped reporting expires.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hivemind
import torch

from dalle_together.config import RunConfig
from dalle_together.errors import UserError
from dalle_together.processes import remove_orphaned_shared_memory
from dalle_together.swarm.definition import RunDefinition, check_compatible, download_files, fetch_definition
from dalle_together.swarm.dht import DEFAULT_HOST_MADDRS, start_dht
from dalle_together.swarm.metrics import publish_metrics, read_status, withdraw_metrics
from dalle_together.swarm.optimizer import make_swarm_optimizer
from dalle_together.swarm.records import run_validators
from dalle_together.swarm.schedule import ScheduleFollower, SwarmSchedule
from dalle_together.train import build_model, local_step, prepare_tokenizers, token_batches

logger = logging.getLogger(__name__)


def lower_this_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux: only this thread, and the threads and
    processes it starts afterwards; elsewhere the whole process), up to the least priority, 19."""
    if nice > 0 and hasattr(os, "setpriority"):
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(current + nice, 19))


@dataclass(kw_only=True, frozen=True)
class VolunteerOptions:
    """What ``dalle-together join`` was asked to do."""

    run_id: str
    initial_peers: Sequence[str]
    cache_dir: Path
    """Where the run's tokenizer files are kept (downloaded once, re-checked on every join)."""
    batch_size: int | None = None
    """Samples per local step; default: the run's ``optim.batch_size``."""
    preset_name: str | None = None
    """If given, must be the run's preset (a check, not a choice)."""
    compression: str | None = None
    """How this peer compresses what it sends when averaging; default: the run's."""
    device: str = "cpu"
    client_mode: bool = False
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS
    announce_maddrs: Sequence[str] = ()
    name: str = ""
    steps: int | None = None
    """Leave after this many local steps."""
    minutes: float | None = None
    """Leave after training this long (joining not counted)."""
    report_every_s: float = 10.0
    """Publish metrics and report progress this often."""
    verbose: bool = False
    """Let hivemind log each epoch's progress and averaging rounds."""
    nice: int = 10
    """Run the computation this much nicer than the averaging (``nice``'s scale, 0-19; 0: as nice
    as it). hivemind averages in processes of their own (and the p2p daemon); when the CPU is short,
    they run first, so a round is not held up by a peer busy computing, and the machine's owner
    keeps a responsive computer. On an otherwise idle CPU it costs nothing."""
    definition_timeout_s: float = 10.0


@dataclass(kw_only=True, frozen=True)
class Joined:
    """Reported once the volunteer has the swarm's state and starts training."""

    peer_id: str
    epoch: int
    cfg: RunConfig
    batch_size: int
    worker: int


@dataclass(kw_only=True, frozen=True)
class VolunteerProgress:
    """One progress report of a training volunteer."""

    epoch: int
    local_samples_per_second: float
    swarm_samples_per_second: float
    peers: int
    loss: float | None
    samples_total: int
    steps: int
    waiting_share: float
    """Share of the time since the last report spent in ``optimizer.step()`` (waiting for the
    swarm: averaging, a delayed update, loading state; and the optimizer's own update, which with
    local updates runs after every local batch) rather than computing gradients."""


@dataclass(kw_only=True, frozen=True)
class VolunteerResult:
    joined_epoch: int
    final_epoch: int
    steps: int
    samples_total: int
    waiting_share: float
    """Share of the training time spent in ``optimizer.step()`` rather than computing."""


def worker_index(peer_id: hivemind.PeerID) -> int:
    """This peer's data stream: a hash of its peer id, so every volunteer draws different samples."""
    return int.from_bytes(hashlib.sha256(peer_id.to_bytes()).digest()[:4], "big")


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return device


def run_volunteer(
    options: VolunteerOptions,
    *,
    stop: threading.Event,
    on_joined: Callable[[Joined], None] = lambda joined: None,
    on_progress: Callable[[VolunteerProgress], None] = lambda progress: None,
) -> VolunteerResult:
    """Join run ``options.run_id`` and train until ``stop`` is set or the budget is spent."""
    if options.batch_size is not None and options.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    dht = start_dht(
        initial_peers=options.initial_peers,
        host_maddrs=options.host_maddrs,
        announce_maddrs=options.announce_maddrs,
        client_mode=options.client_mode,
        record_validators=run_validators(options.run_id),
    )
    # debug: a user's error (a run nobody serves, ...) must stay the one line they see
    if removed := remove_orphaned_shared_memory():
        logger.debug(f"deleted {removed} shared-memory files that killed peers left in /dev/shm")
    optimizer: hivemind.Optimizer | None = None
    follower: ScheduleFollower | None = None
    joined = False
    try:
        definition = fetch_definition(
            dht,
            options.run_id,
            timeout_s=options.definition_timeout_s,
            trusted_peers=options.initial_peers,
        )
        cfg = check_compatible(
            definition,
            {
                "preset": options.preset_name,
                "optim.batch_size": options.batch_size,
                "swarm.compression": options.compression,
            },
        )
        batch_size = cfg.optim.batch_size
        if batch_size > cfg.optim.target_batch_size:
            raise UserError(
                f"--batch-size {batch_size} exceeds the run's target batch size "
                f"{cfg.optim.target_batch_size} (samples per optimizer step of the whole swarm)"
            )
        download_files(dht, definition, options.cache_dir)
        text_tokenizer, vqvae = prepare_tokenizers(cfg, options.cache_dir, device=options.device)

        model = build_model(cfg, options.device)
        schedule = SwarmSchedule(cfg.optim)
        follower = follow_schedule(dht, definition, schedule)
        optimizer = make_swarm_optimizer(
            dht=dht,
            run_id=options.run_id,
            model=model,
            cfg=cfg,
            batch_size_per_step=batch_size,
            client_mode=options.client_mode,
            schedule=schedule,
            verbose=options.verbose,
        )
        # after hivemind started its averagers' processes, which keep the priority they had
        lower_this_thread_priority(options.nice)
        optimizer.load_state_from_peers()
        worker = worker_index(dht.peer_id)
        joined_epoch = optimizer.local_epoch
        on_joined(
            Joined(
                peer_id=str(dht.peer_id), epoch=joined_epoch, cfg=cfg, batch_size=batch_size, worker=worker
            )
        )
        joined = True
        trainer = _Trainer(
            dht=dht,
            options=options,
            cfg=cfg,
            batch_size=batch_size,
            model=model,
            optimizer=optimizer,
            batches=token_batches(
                cfg, text_tokenizer, vqvae, batch_size=batch_size, worker=worker, device=options.device
            ),
            on_progress=on_progress,
        )
        trainer.train(stop)
        return VolunteerResult(
            joined_epoch=joined_epoch,
            final_epoch=optimizer.local_epoch,
            steps=trainer.steps,
            samples_total=trainer.samples_total,
            waiting_share=trainer.waiting_s / max(trainer.training_s, 1e-9),
        )
    finally:
        if follower is not None:
            follower.stop()
        _leave(dht, options.run_id, optimizer, said_hello=joined)


def follow_schedule(
    dht: hivemind.DHT, definition: RunDefinition, schedule: SwarmSchedule
) -> ScheduleFollower | None:
    """Keep ``schedule`` up to date with the one the coordinator fits, if it fits one (without a
    time budget no schedule record ever comes: polling for it would be a DHT request every 2 s)."""
    if not definition.fitted_schedule:
        return None
    return ScheduleFollower(dht, definition.run_id, publisher=definition.publisher, schedule=schedule)


class _Trainer:
    """The training loop of one volunteer, with its metrics."""

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        options: VolunteerOptions,
        cfg: RunConfig,
        batch_size: int,
        model: torch.nn.Module,
        optimizer: hivemind.Optimizer,
        batches,
        on_progress: Callable[[VolunteerProgress], None],
    ) -> None:
        self.dht, self.options, self.cfg, self.batch_size = dht, options, cfg, batch_size
        self.model, self.optimizer, self.batches, self.on_progress = model, optimizer, batches, on_progress
        self.steps = self.samples_total = 0
        self.waiting_s = self.training_s = 0.0
        self.loss: float | None = None
        self.fingerprint = cfg.fingerprint()
        self.device = device_description(options.device)

    def train(self, stop: threading.Event) -> None:
        options = self.options
        started = time.monotonic()
        deadline = started + options.minutes * 60 if options.minutes is not None else math.inf
        self._publish(samples_per_second=0.0)  # visible in `status` from the start
        last_report, samples_at_last_report, waiting_at_last_report = started, 0, 0.0
        self.model.train()
        while not stop.is_set() and time.monotonic() < deadline:
            if options.steps is not None and self.steps >= options.steps:
                break
            metrics = local_step(self.model, next(self.batches), self.optimizer, device=options.device)
            self.steps += 1
            self.samples_total += self.batch_size
            self.waiting_s += metrics["optimizer_s"]
            loss = metrics["loss"]
            if math.isfinite(loss):
                self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
            now = time.monotonic()
            self.training_s = now - started
            if now - last_report >= options.report_every_s:
                rate = (self.samples_total - samples_at_last_report) / (now - last_report)
                waiting = (self.waiting_s - waiting_at_last_report) / (now - last_report)
                last_report, samples_at_last_report = now, self.samples_total
                waiting_at_last_report = self.waiting_s
                self._report(rate, waiting)

    def _report(self, samples_per_second: float, waiting_share: float) -> None:
        self._publish(samples_per_second)
        try:
            status = read_status(self.dht, self.options.run_id)
            swarm_rate, peers = status.samples_per_second, status.alive_peers
        except Exception as e:  # the DHT may be busy; the next report will do
            logger.debug(f"could not read the run's status: {e}")
            swarm_rate, peers = math.nan, 0
        self.on_progress(
            VolunteerProgress(
                epoch=self.optimizer.local_epoch,
                local_samples_per_second=samples_per_second,
                swarm_samples_per_second=swarm_rate,
                peers=peers,
                loss=self.loss,
                samples_total=self.samples_total,
                steps=self.steps,
                waiting_share=waiting_share,
            )
        )

    def _publish(self, samples_per_second: float) -> None:
        stored = publish_metrics(
            self.dht,
            self.options.run_id,
            samples_total=self.samples_total,
            samples_per_second=samples_per_second,
            loss=self.loss,
            local_epoch=self.optimizer.local_epoch,
            fingerprint=self.fingerprint,
            device=self.device,
            name=self.options.name,
            expiration_s=max(60.0, 3 * self.options.report_every_s),
        )
        if not stored:
            logger.debug("could not publish metrics; will retry")


def _leave(dht: hivemind.DHT, run_id: str, optimizer: hivemind.Optimizer | None, *, said_hello: bool) -> None:
    """Withdraw this peer's metrics, shut the optimizer and the DHT down; never raises."""
    if said_hello:
        with contextlib.suppress(Exception):
            withdraw_metrics(dht, run_id)
    if optimizer is not None:
        try:
            optimizer.shutdown()
        except Exception as e:
            logger.debug(f"optimizer shutdown: {e}")
    with contextlib.suppress(Exception):
        dht.shutdown()


__all__ = [
    "Joined",
    "VolunteerOptions",
    "VolunteerProgress",
    "VolunteerResult",
    "run_volunteer",
    "worker_index",
]
