"""A schedule that fits a time budget: the coordinator measures the swarm's pace, everyone follows.

A run defined by epochs (``optim.total_steps``) needs nothing from here. A run with a wall-clock
budget (``dalle-together coordinator --schedule-minutes M``, which ``make demo`` uses) cannot know in
advance how many epochs it will reach: that depends on who joins, on their machines, and on who
leaves. Single-machine ``train --minutes`` measures its own speed after 30 steps and fits the
cosine to the steps it can do; a collaboration's pace changes as volunteers come and go, and
every peer must apply the same learning rate at the same epoch. So one peer decides, again
whenever the pace changes, and the others follow:

- the coordinator (:class:`ScheduleFitter`) watches the global epoch. Once the swarm has advanced
  :data:`FIT_AFTER_EPOCHS` epochs it predicts the epoch it will reach at the deadline and appends
  a :class:`Segment` to the schedule: from a *future* epoch (:data:`LEAD_S` of training ahead,
  and not before warm-up ends) the cosine goes on from where it is then and reaches its floor at
  the predicted epoch. The learning rate stays continuous; only its slope changes. It refits every
  :data:`REFIT_S` seconds if the prediction has moved by more than :data:`REFIT_TOLERANCE`;
- the coordinator publishes the whole list of segments (a few dozen numbers) in the DHT;
- each volunteer (:class:`ScheduleFollower`) reads it before its first step and every
  :data:`POLL_S` seconds into a :class:`SwarmSchedule`, which its learning-rate scheduler asks at
  every epoch. The lead gives every peer time to learn of a segment before it applies; a peer
  that learns of one late applies the old slope for an epoch or two, and the next state averaging
  pulls its parameters back to the others'.

The record is signed (hivemind's ``RSASignatureValidator``) and a volunteer only follows the entry
published under the key that published the run's definition (the coordinator keeps that key
across restarts): whoever may define the run may set its schedule, nobody else.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import hivemind
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from dalle_together.config import OptimConfig
from dalle_together.optim import cosine_multiplier, lr_multiplier, schedule_progress
from dalle_together.swarm.dht import local_public_key
from dalle_together.swarm.records import MAX_SCHEDULE_SEGMENTS, ScheduleRecord, read_entries, schedule_key

logger = get_logger(__name__)

FIT_AFTER_EPOCHS = 20
"""Epochs over which the coordinator measures the swarm's pace (``train`` measures 30 steps)."""
SKIP_EPOCHS = 2
"""Epochs left out of the first measurement: volunteers are still joining, first steps allocate."""
LEAD_S = 10.0
"""A new segment applies this many seconds of epochs ahead: time for every volunteer to read it."""
CATCH_UP_EPOCHS = 50
"""More epochs than this between two observations is the coordinator's view catching up (after a
restart), not training: the pace is measured afresh from there."""
REFIT_S = 30.0
"""The coordinator predicts the end again this often (from the pace over this last stretch)."""
REFIT_TOLERANCE = 0.03
"""...and appends a segment only if the predicted end moved by more than this share of the
epochs left: a steady swarm keeps its schedule."""
POLL_S = 2.0
"""How often a volunteer re-reads the schedule record."""
EXPIRATION_S = 300.0


@dataclass(frozen=True)
class Segment:
    """From ``from_epoch`` on, the cosine goes from ``start_progress`` to its end at ``total_steps``."""

    from_epoch: int
    total_steps: int
    start_progress: float


class SwarmSchedule:
    """The learning-rate multiplier at each epoch: the run's definition, then the fitted segments.

    Shared between a follower thread (which replaces ``segments``) and the learning-rate scheduler
    (which reads it at every epoch); one assignment of an immutable tuple, so no lock is needed.
    """

    def __init__(self, cfg: OptimConfig, segments: Sequence[Segment] = ()) -> None:
        self.cfg = cfg
        self.segments: tuple[Segment, ...] = tuple(segments)

    def multiplier(self, epoch: int) -> float:
        segments = self.segments  # read once: a follower may replace it meanwhile
        if _segment_at(segments, epoch) is None:
            return lr_multiplier(epoch, self.cfg)
        return cosine_multiplier(_progress(segments, epoch, self.cfg), self.cfg)

    def progress(self, epoch: int) -> float:
        """How far along its cosine the schedule is at ``epoch`` (0: warm-up just ended, 1: the end)."""
        return _progress(self.segments, epoch, self.cfg)

    def total_steps(self, epoch: int) -> int:
        """Where the cosine ends, as the schedule stands at ``epoch``."""
        segment = _segment_at(self.segments, epoch)
        return segment.total_steps if segment is not None else self.cfg.total_steps


def _segment_at(segments: Sequence[Segment], epoch: int) -> Segment | None:
    return next((s for s in reversed(segments) if s.from_epoch <= epoch), None)


def _progress(segments: Sequence[Segment], epoch: int, cfg: OptimConfig) -> float:
    segment = _segment_at(segments, epoch)
    if segment is None:
        return schedule_progress(epoch, cfg)
    span = max(segment.total_steps - segment.from_epoch, 1)
    done = min(max(epoch - segment.from_epoch, 0) / span, 1.0)
    return segment.start_progress + (1 - segment.start_progress) * done


class ScheduleFitter:
    """The coordinator's side: measure the global epoch's pace and fit the schedule to ``deadline``.

    :param schedule: the run's schedule, with the segments fitted so far (a restarted coordinator
      has some); :meth:`observe` appends its fits to it, in place, so whoever reads it (the
      coordinator's auxiliary peer, its checkpoints) sees them at once.
    :param deadline: ``time.monotonic()`` at which the run's time budget ends.
    """

    def __init__(
        self,
        *,
        schedule: SwarmSchedule,
        deadline: float,
        fit_after_epochs: int = FIT_AFTER_EPOCHS,
        skip_epochs: int = SKIP_EPOCHS,
        refit_s: float = REFIT_S,
        lead_s: float = LEAD_S,
    ) -> None:
        self.schedule = schedule
        self.deadline, self.fit_after_epochs, self.skip_epochs = deadline, fit_after_epochs, skip_epochs
        self.refit_s, self.lead_s = refit_s, lead_s
        self._first: int | None = None
        self._last: int | None = None
        self._window: tuple[int, float] | None = None
        """(epoch, time) the current pace measurement started at."""

    def observe(self, epoch: int, now: float) -> bool:
        """Feed the global epoch seen at ``now``; True if a segment was appended.

        Poll often: the pace's clock starts at the first observation ``skip_epochs`` past the first
        epoch seen, and each measurement ends at the first observation ``fit_after_epochs`` (and,
        once fitted, ``refit_s`` seconds) later.
        """
        last, self._last = self._last, epoch
        if self._first is None or epoch < self._first:
            self._first, self._window = epoch, None
        elif last is not None and epoch - last > CATCH_UP_EPOCHS:
            self._window = None
        if epoch < self._first + self.skip_epochs:
            return False
        if self._window is None:
            self._window = (epoch, now)
            return False
        start_epoch, start_time = self._window
        if epoch - start_epoch < self.fit_after_epochs or now - start_time < self._min_window_s():
            return False
        self._window = (epoch, now)
        left = self.deadline - now
        if left < 2 * self.lead_s:
            return False  # too late for a change to matter
        pace = (epoch - start_epoch) / (now - start_time)
        segments = self.schedule.segments
        from_epoch = max(epoch + math.ceil(pace * self.lead_s) + 1, self.schedule.cfg.warmup_steps)
        if segments:  # segments apply in order
            from_epoch = max(from_epoch, segments[-1].from_epoch + 1)
        total = max(epoch + int(pace * left), from_epoch + 1)
        if segments and abs(total - self.schedule.total_steps(from_epoch)) <= REFIT_TOLERANCE * max(
            total - epoch, 1
        ):
            return False
        segment = Segment(
            from_epoch=from_epoch, total_steps=total, start_progress=self.schedule.progress(from_epoch)
        )
        self.schedule.segments = (*_prune(segments, epoch - self.fit_after_epochs), segment)
        logger.info(
            f"schedule fitted to the time budget: the cosine ends at epoch {total} "
            f"(from epoch {from_epoch}; {pace:.2f} epochs/s measured at epoch {epoch}, {left:.0f} s left)"
        )
        return True

    def _min_window_s(self) -> float:
        return 0.0 if not self.schedule.segments else self.refit_s


def _prune(segments: Sequence[Segment], before_epoch: int) -> tuple[Segment, ...]:
    """The segments that still decide an epoch from ``before_epoch`` on (each one continues the
    curve where the previous one left it, so the older ones are not needed), at most
    ``MAX_SCHEDULE_SEGMENTS - 1`` of them."""
    kept = [
        s
        for i, s in enumerate(segments)
        if i + 1 == len(segments) or segments[i + 1].from_epoch > before_epoch
    ]
    return tuple(kept[-(MAX_SCHEDULE_SEGMENTS - 1) :])


def publish_schedule(
    dht: hivemind.DHT, run_id: str, segments: Sequence[Segment], *, expiration_s: float = EXPIRATION_S
) -> bool:
    """Publish (or refresh) the run's fitted schedule under this peer's key; True if stored."""
    now = get_dht_time()
    record = ScheduleRecord(segments=[asdict(s) for s in segments], time=float(now))
    return bool(
        dht.store(
            key=schedule_key(run_id),
            subkey=local_public_key(dht),
            value=record.dict(),
            expiration_time=now + expiration_s,
        )
    )


def read_schedule(dht: hivemind.DHT, run_id: str, *, publisher: bytes) -> tuple[Segment, ...] | None:
    """The segments ``publisher`` (the definition's key) published, if any."""
    record = read_entries(dht, schedule_key(run_id), ScheduleRecord).get(publisher)
    if record is None:
        return None
    return segments_from_dicts([s.dict() for s in record.segments])


def segments_from_dicts(items: Sequence[dict[str, Any]]) -> tuple[Segment, ...]:
    """Segments as stored in a record or a checkpoint's state."""
    return tuple(
        Segment(
            from_epoch=int(item["from_epoch"]),
            total_steps=int(item["total_steps"]),
            start_progress=float(item["start_progress"]),
        )
        for item in items
    )


class ScheduleFollower:
    """A volunteer's side: keep ``schedule`` up to date with the published segments.

    The first read happens in the constructor, so a joiner knows the schedule before it downloads
    the swarm's state (its scheduler catches up to the joined epoch with the right segments).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        *,
        publisher: bytes,
        schedule: SwarmSchedule,
        poll_s: float = POLL_S,
    ) -> None:
        self.dht, self.run_id, self.publisher = dht, run_id, publisher
        self.schedule, self.poll_s = schedule, poll_s
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="schedule-follower", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            segments = read_schedule(self.dht, self.run_id, publisher=self.publisher)
        except Exception as e:  # a busy DHT: the next poll will do
            logger.debug(f"could not read the run's schedule: {e}")
            return
        if segments and segments != self.schedule.segments:
            last = segments[-1]
            logger.info(
                f"following the run's schedule: the cosine ends at epoch {last.total_steps} "
                f"(from epoch {last.from_epoch})"
            )
            self.schedule.segments = segments

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5.0)
