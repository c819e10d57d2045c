"""The coordinator: the run's first peer, its definition, and the keeper of its checkpoints.

``dalle-together coordinator`` runs :func:`run_coordinator`. It

1. settles the run's configuration (a preset plus options, or the one ``DIR/run.json`` holds when
   it restarts) and trains the tokenizers unless ``DIR`` has them;
2. starts the first DHT peer with a persistent identity (``DIR/coordinator.key``), so the
   addresses volunteers were given stay valid across restarts, and after a restart reconnects to
   the peers it was connected to before (``DIR/peers.json``);
3. publishes the run's definition and serves the tokenizer files (refreshed periodically);
4. runs the auxiliary peer (:class:`SwarmCheckpointer`) in a thread: every K global epochs it
   downloads the swarm's state and saves it as an ordinary checkpoint in ``DIR``, which
   ``generate`` and ``evaluate`` read; after a restart it resumes from the newest one and shares
   it, so the run's epoch count survives;
5. with a time budget (``--schedule-minutes``), fits the learning-rate schedule to the swarm's
   measured pace, again as the pace changes, and publishes it (:mod:`.schedule`); the schedule is
   saved with each checkpoint and published again after a restart;
6. reports the collaboration's status periodically, until ``stop`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hivemind
import torch

from dalle_together.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    RUN_FILE,
    STATE_FILE,
    TOKENIZER_FILES,
    load_json,
    load_model_weights,
    read_latest,
    save_checkpoint,
    write_json_atomic,
)
from dalle_together.config import RunConfig, SwarmConfig, preset
from dalle_together.errors import UserError
from dalle_together.swarm.checkpointer import SwarmCheckpointer
from dalle_together.swarm.definition import publish_definition
from dalle_together.swarm.dht import (
    DEFAULT_HOST_MADDRS,
    check_initial_peer,
    connected_peers,
    load_record_key,
    reconnect,
    start_dht,
    visible_maddrs,
)
from dalle_together.swarm.metrics import read_status
from dalle_together.swarm.records import run_validators
from dalle_together.swarm.schedule import EXPIRATION_S as SCHEDULE_EXPIRATION_S
from dalle_together.swarm.schedule import (
    ScheduleFitter,
    Segment,
    SwarmSchedule,
    publish_schedule,
    segments_from_dicts,
)
from dalle_together.train import TrainState, build_model, prepare_tokenizers

logger = logging.getLogger(__name__)

IDENTITY_FILE = "coordinator.key"
"""The coordinator's libp2p key in its directory: same key, same peer id, same addresses."""
RECORD_KEY_FILE = "records.key"
"""The RSA key that signs the coordinator's DHT records: the same key after a restart, so the
volunteers that follow its schedule by key keep following it."""
SCHEDULE_FILE = "schedule.json"
"""The schedule fitted to the time budget, rewritten whenever it changes (checkpoints lag behind)."""
SWARM_FILE = "swarm.json"
"""Which run id the directory belongs to (a directory serves one run)."""
PEERS_FILE = "peers.json"
"""The peers the coordinator was last connected to, refreshed with each status report: a restarted
coordinator reconnects to them (nobody else would tell the swarm it is back)."""
MAX_REMEMBERED_PEERS = 64

COORDINATOR_LOCAL_OPTIONS = frozenset({"swarm.checkpoint_every_epochs", "swarm.keep_checkpoints"})
"""Options that only concern the coordinator itself: a restart may change them."""

DEFINITION_EXPIRATION_S = 300.0
DEFINITION_REFRESH_S = 100.0


@dataclass(kw_only=True, frozen=True)
class CoordinatorOptions:
    """What ``dalle-together coordinator`` was asked to do."""

    run_id: str
    checkpoint_dir: Path
    preset_name: str | None = None
    """``None``: the run ``checkpoint_dir`` holds, or ``tiny`` for a new run."""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``{"section.field": value}`` changes to the preset (``None`` values: not given)."""
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS
    announce_maddrs: Sequence[str] = ()
    tokenizer_minutes: float | None = None
    """Training time of the image tokenizer if ``checkpoint_dir`` has none (default: the preset's)."""
    status_every_s: float = 30.0
    save_on_exit: bool = True
    """Download and save the swarm's state once more when stopping, if it moved on since the last save."""
    schedule_minutes: float | None = None
    """Fit the cosine schedule to this wall-clock budget, counted from when volunteers may join
    (after a restart: from the restart; ``None``: the run's ``optim.total_steps``, or the schedule
    fitted before a restart)."""


@dataclass(kw_only=True, frozen=True)
class CoordinatorStatus:
    """One status report: the collaboration as the coordinator sees it."""

    epoch: int
    samples_per_second: float
    alive_peers: int
    training_peers: int
    samples_accumulated: int
    target_batch_size: int
    loss: float | None
    last_checkpoint_epoch: int | None


@dataclass(kw_only=True, frozen=True)
class CoordinatorReady:
    """What the coordinator tells its user once volunteers can join."""

    addresses: list[str]
    """Multiaddrs (``/ip4/.../tcp/.../p2p/...``) volunteers pass as ``--initial-peers``."""
    cfg: RunConfig
    resumed_epoch: int | None
    """The checkpoint's epoch when a restarted coordinator resumed, else ``None``."""
    reconnected: tuple[int, int] | None = None
    """After a restart: (peers that answered, peers it knew before), else ``None``."""
    schedule_end: int | None = None
    """Where the cosine ends as fitted to a time budget before a restart (None: not fitted)."""


# --- the run's configuration -------------------------------------------------------------------


def settle_config(options: CoordinatorOptions) -> RunConfig:
    """The run's configuration: the stored one on a restart (options must agree), else the preset's."""
    run_dir, overrides = options.checkpoint_dir, dict(options.overrides)
    swarm_file = run_dir / SWARM_FILE
    if swarm_file.is_file():
        stored_run = load_json(swarm_file, "coordinator state").get("run_id")
        if stored_run != options.run_id:
            raise UserError(
                f"{run_dir} belongs to run {stored_run!r}, not {options.run_id!r}; "
                f"use another --checkpoint-dir or --run-id {stored_run}"
            )
    if not (run_dir / RUN_FILE).is_file():
        cfg = preset(options.preset_name or "tiny")
        return _apply(cfg, overrides)

    try:
        stored = RunConfig.from_dict(load_json(run_dir / RUN_FILE, "run definition"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the run definition in {run_dir} is unreadable ({e})") from None
    if options.preset_name is not None and options.preset_name != stored.preset:
        raise UserError(
            f"{run_dir} holds a run of preset {stored.preset!r}, not {options.preset_name!r}; "
            f"leave --preset out to resume it, or use another --checkpoint-dir"
        )
    for key, value in overrides.items():
        if value is None or key in COORDINATOR_LOCAL_OPTIONS:
            continue
        section, _, name = key.partition(".")
        current = getattr(getattr(stored, section), name)
        if current != value:
            raise UserError(
                f"{run_dir} holds a run defined with {key} = {current!r}, but you asked for {value!r}; "
                f"leave the option out to resume it, or use another --checkpoint-dir"
            )
    return _apply(stored, {k: v for k, v in overrides.items() if k in COORDINATOR_LOCAL_OPTIONS})


def _apply(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if not hasattr(getattr(cfg, section, None), name):
            raise ValueError(f"unknown configuration option {key!r}")
        sections.setdefault(section, {})[name] = value
    if not sections:
        return cfg
    try:
        return cfg.replace(
            **{name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in sections.items()}
        )
    except TypeError as e:
        raise UserError(f"invalid option: {e}") from None


def check_swarm_options(cfg: RunConfig) -> None:
    """Values that would make the collaboration misbehave, as one sentence each."""
    if cfg.optim.target_batch_size <= 0:
        raise UserError("--target-batch-size must be positive")
    if cfg.swarm.average_state_every < 1:
        raise UserError("--average-state-every must be at least 1")
    if cfg.swarm.checkpoint_every_epochs < 1:
        raise UserError("--checkpoint-every-epochs must be at least 1")
    if cfg.swarm.keep_checkpoints < 1:
        raise UserError("--keep-checkpoints must be at least 1")
    if cfg.swarm.matchmaking_time_s <= 0:
        raise UserError("--matchmaking-time must be positive")
    if cfg.swarm.next_chunk_timeout_s is not None and cfg.swarm.next_chunk_timeout_s <= 0:
        raise UserError("--next-chunk-timeout must be positive")
    if cfg.optim.total_steps < 1 or cfg.optim.warmup_steps < 0:
        raise UserError("--total-steps must be positive and --warmup-steps non-negative")
    if cfg.swarm.local_updates and (cfg.swarm.delay_optimizer_step or cfg.swarm.delay_grad_averaging):
        raise UserError("--local-updates applies every update at once: drop --delayed-updates")


# --- running -----------------------------------------------------------------------------------


def run_coordinator(
    options: CoordinatorOptions,
    *,
    stop: threading.Event,
    on_ready: Callable[[CoordinatorReady], None],
    on_status: Callable[[CoordinatorStatus], None],
) -> None:
    """Coordinate run ``options.run_id`` until ``stop`` is set; see the module's docstring."""
    run_dir = options.checkpoint_dir
    cfg = settle_config(options)
    check_swarm_options(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_tokenizers(cfg, run_dir, vq_minutes=options.tokenizer_minutes)
    write_json_atomic(run_dir / RUN_FILE, cfg.to_dict())
    write_json_atomic(run_dir / SWARM_FILE, {"run_id": options.run_id})
    if stop.is_set():
        return

    dht = start_dht(
        initial_peers=[],
        host_maddrs=options.host_maddrs,
        announce_maddrs=options.announce_maddrs,
        identity_path=run_dir / IDENTITY_FILE,
        record_key=load_record_key(run_dir / RECORD_KEY_FILE),
        record_validators=run_validators(options.run_id),
    )
    checkpointer: SwarmCheckpointer | None = None
    saver: threading.Thread | None = None
    scheduler: threading.Thread | None = None
    stop_saver = threading.Event()
    try:
        remembered = _remembered_peers(run_dir)
        reconnected = reconnect(dht, remembered) if remembered else None
        files = {name: run_dir / name for name in TOKENIZER_FILES}
        publish = partial(
            publish_definition,
            dht,
            options.run_id,
            cfg,
            files,
            expiration_s=DEFINITION_EXPIRATION_S,
            # volunteers follow a schedule only if one comes: fitted from now on, or before a restart
            fitted_schedule=options.schedule_minutes is not None or (run_dir / SCHEDULE_FILE).is_file(),
        )
        publish()
        # read the addresses before any optimizer exists (hivemind 1.1.12 may hang on them later)
        addresses = visible_maddrs(dht)

        keeper = _CheckpointKeeper(run_dir, cfg)
        checkpointer = SwarmCheckpointer(
            dht=dht,
            run_id=options.run_id,
            model=build_model(cfg),
            cfg=cfg,
            save=keeper.save,
            load_state_timeout_s=60.0,
            schedule=keeper.schedule,
        )
        resumed = keeper.restore(checkpointer)
        on_ready(
            CoordinatorReady(
                addresses=addresses,
                cfg=cfg,
                resumed_epoch=resumed,
                reconnected=reconnected,
                schedule_end=keeper.segments[-1].total_steps if keeper.segments else None,
            )
        )

        saver = threading.Thread(
            target=_keep_saving, args=(checkpointer, stop_saver), name="checkpointer", daemon=True
        )
        saver.start()
        fitter = None
        if options.schedule_minutes is not None:
            deadline = time.monotonic() + options.schedule_minutes * 60
            fitter = ScheduleFitter(schedule=keeper.schedule, deadline=deadline)
        if keeper.segments or fitter is not None:
            scheduler = threading.Thread(
                target=_keep_schedule,
                args=(dht, options.run_id, keeper, fitter, checkpointer, stop_saver),
                name="schedule",
                daemon=True,
            )
            scheduler.start()
        last_published, epoch = time.monotonic(), checkpointer.local_epoch
        known = remembered
        while not stop.wait(options.status_every_s):
            peers = connected_peers(dht)[:MAX_REMEMBERED_PEERS]
            if peers and peers != known:  # none (a moment alone) would forget the swarm
                write_json_atomic(run_dir / PEERS_FILE, {"peers": peers})
                known = peers
            status = read_status(dht, options.run_id)
            keeper.loss = status.loss
            # the run's epoch never goes back, even once every volunteer has left
            epoch = max(epoch, status.global_epoch, checkpointer.global_epoch)
            on_status(
                CoordinatorStatus(
                    epoch=epoch,
                    samples_per_second=status.samples_per_second,
                    alive_peers=status.alive_peers,
                    training_peers=status.training_peers,
                    samples_accumulated=status.samples_accumulated,
                    target_batch_size=cfg.optim.target_batch_size,
                    loss=status.loss,
                    last_checkpoint_epoch=keeper.last_epoch,
                )
            )
            if time.monotonic() - last_published >= DEFINITION_REFRESH_S:
                publish()
                last_published = time.monotonic()
    finally:
        stop_saver.set()
        if scheduler is not None:
            scheduler.join(timeout=10.0)
        if saver is not None:
            saver.join(timeout=90.0)
        if checkpointer is not None:
            if options.save_on_exit and saver is not None and not saver.is_alive():
                _final_save(checkpointer, dht, options.run_id)
            checkpointer.shutdown()
        dht.shutdown()


def _remembered_peers(run_dir: Path) -> list[str]:
    """The addresses ``DIR/peers.json`` holds; none if it is missing or unreadable (it is only a hint)."""
    path = run_dir / PEERS_FILE
    if not path.is_file():
        return []
    try:
        peers = load_json(path, "known peers")["peers"]
    except (UserError, KeyError, TypeError) as e:
        logger.warning(f"ignoring {path}: {e}")
        return []
    return [p for p in peers if isinstance(p, str) and _is_peer_address(p)]


def _is_peer_address(text: str) -> bool:
    try:
        check_initial_peer(text)  # what a volunteer's --initial-peers must be, too
    except UserError:
        return False
    return True


def _keep_saving(checkpointer: SwarmCheckpointer, stop: threading.Event, poll_s: float = 2.0) -> None:
    """The auxiliary peer's loop: save every K epochs; a failed save is logged and retried later."""
    while not stop.wait(poll_s):
        try:
            checkpointer.poll()
        except Exception as e:  # a full disk, a peer that vanished mid-download: keep coordinating
            logger.warning(f"saving a checkpoint failed ({type(e).__name__}: {e}); will retry")


def _keep_schedule(
    dht: hivemind.DHT,
    run_id: str,
    keeper: _CheckpointKeeper,
    fitter: ScheduleFitter | None,
    checkpointer: SwarmCheckpointer,
    stop: threading.Event,
    poll_s: float = 0.5,
) -> None:
    """Fit the schedule to the swarm's pace (watching the global epoch every ``poll_s``), publish
    it whenever it changes, and keep the published record from expiring."""
    last_published, published = -math.inf, ()
    while not stop.is_set():
        try:
            # the epoch as the auxiliary peer's progress tracker sees it: hivemind reads the swarm's
            # progress there anyway (every 0.1-0.5 s), so watching it costs no DHT request
            now = time.monotonic()
            if (
                fitter is not None
                and now < fitter.deadline
                and fitter.observe(checkpointer.global_epoch, now)
            ):
                keeper.save_schedule()
            segments = keeper.segments
            due = time.monotonic() - last_published >= SCHEDULE_EXPIRATION_S / 3
            if segments and (segments != published or due):
                if publish_schedule(dht, run_id, segments, expiration_s=SCHEDULE_EXPIRATION_S):
                    last_published, published = time.monotonic(), segments
                else:
                    logger.warning("could not publish the run's schedule in the DHT; will retry")
        except Exception as e:  # a busy or stopping DHT, a full disk: keep coordinating, try again
            logger.warning(f"keeping the run's schedule failed ({type(e).__name__}: {e}); will retry")
        stop.wait(poll_s)


def _final_save(checkpointer: SwarmCheckpointer, dht: hivemind.DHT, run_id: str) -> None:
    # the auxiliary peer's tracker refreshes its view of the swarm every few seconds, so it may not
    # know yet that a volunteer has just finished an epoch: the volunteers' own records are newer
    newest = checkpointer.global_epoch
    with contextlib.suppress(Exception):  # a DHT that is already failing: go by the tracker
        newest = max(newest, read_status(dht, run_id).global_epoch)
    if newest <= checkpointer.last_saved_epoch:
        return
    logger.info("saving the swarm's latest state before stopping")
    try:
        checkpointer.save_now()
    except Exception as e:
        logger.warning(f"could not save the swarm's latest state ({type(e).__name__}: {e})")


class _CheckpointKeeper:
    """Writes the auxiliary peer's downloads as ordinary checkpoints, and restores the newest one."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.loss: float | None = None
        self.last_epoch: int | None = None
        self.schedule = SwarmSchedule(cfg.optim)
        """The run's learning rate per epoch: the definition's, or as fitted to its time budget."""
        self.elapsed_before_s = 0.0
        self.started = time.monotonic()

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.schedule.segments

    def set_segments(self, segments: Sequence[Segment]) -> None:
        """Adopt a newly fitted schedule and keep it on disk."""
        self.schedule.segments = tuple(segments)
        self.save_schedule()

    def save_schedule(self) -> None:
        """Keep the schedule on disk at once, as it now stands (the next checkpoint may be many
        epochs away, and a restart must not go back to an older schedule)."""
        write_json_atomic(
            self.run_dir / SCHEDULE_FILE, {"segments": [dataclasses.asdict(s) for s in self.segments]}
        )

    def save(self, model: torch.nn.Module, epoch: int, optimizer_state: dict[str, Any]) -> None:
        state = TrainState(
            step=epoch,
            samples_seen=epoch * self.cfg.optim.target_batch_size,
            elapsed_s=self.elapsed_before_s + time.monotonic() - self.started,
            schedule_total_steps=self.segments[-1].total_steps
            if self.segments
            else self.cfg.optim.total_steps,
            schedule_segments=[dataclasses.asdict(s) for s in self.segments],
            loss=self.loss if self.loss is not None else math.nan,
        )
        path = save_checkpoint(
            self.run_dir,
            cfg_dict=self.cfg.to_dict(),
            model=model,
            state=asdict(state),
            optimizer_state=optimizer_state,
            keep=self.cfg.swarm.keep_checkpoints,
        )
        self.last_epoch = epoch
        logger.info(f"saved checkpoint {path}")

    def restore(self, checkpointer: SwarmCheckpointer) -> int | None:
        """Load the newest checkpoint into the auxiliary peer, and the fitted schedule; the
        checkpoint's epoch, or None for a new run."""
        schedule_file = self.run_dir / SCHEDULE_FILE
        if schedule_file.is_file():
            try:
                self.schedule.segments = segments_from_dicts(load_json(schedule_file, "schedule")["segments"])
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(
                    f"{schedule_file} is not a schedule ({e}); delete it to fit a new one"
                ) from None
        latest = read_latest(self.run_dir)
        if latest is None:
            return None
        state = load_json(latest / STATE_FILE, "training state")
        epoch = int(state.get("step", 0))
        self.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        optimizer_state = None
        if (latest / OPTIMIZER_FILE).is_file():
            try:
                optimizer_state = torch.load(latest / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"optimizer state in {latest} is corrupt ({type(e).__name__})") from None
        # after the optimizer's construction, which nudges the weights (see SwarmCheckpointer.restore)
        load_model_weights(checkpointer.model, latest / MODEL_FILE)
        try:
            checkpointer.restore(epoch=epoch, optimizer_state=optimizer_state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(
                f"the checkpoint {latest} does not fit this run's optimizer ({type(e).__name__}: {e})"
            ) from None
        self.last_epoch = epoch
        return epoch


def describe_config(
    cfg: RunConfig, *, schedule_minutes: float | None = None, schedule_end: int | None = None
) -> str:
    """One line about the run a coordinator serves."""
    o = cfg.optim
    if schedule_minutes is not None:
        cosine = f"cosine fitted to {schedule_minutes:g} minutes"
    elif schedule_end is not None:
        cosine = f"cosine fitted to end at epoch {schedule_end}"
    else:
        cosine = f"cosine over {o.total_steps} epochs"
    return (
        f"preset {cfg.preset}, target batch {o.target_batch_size}, lr {o.lr:g} "
        f"(warm-up {o.warmup_steps}, {cosine}), "
        f"averaging {cfg.swarm.compression}, "
        f"{_updates(cfg.swarm)}, checkpoint every {cfg.swarm.checkpoint_every_epochs} epochs"
    )


def _updates(swarm: SwarmConfig) -> str:
    if swarm.local_updates:
        return f"local updates, parameters averaged every {swarm.average_state_every} epochs"
    return f"{'delayed' if swarm.delay_optimizer_step else 'immediate'} updates"


__all__ = [
    "CoordinatorOptions",
    "CoordinatorReady",
    "CoordinatorStatus",
    "describe_config",
    "run_coordinator",
    "settle_config",
]
