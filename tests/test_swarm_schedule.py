"""A schedule fitted to a time budget: the coordinator's fits, the record, and the volunteers' schedule."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from hivemind.utils import get_dht_time

from dalle_together.config import preset
from dalle_together.errors import UserError
from dalle_together.optim import lr_multiplier
from dalle_together.swarm.checkpointer import SwarmCheckpointer
from dalle_together.swarm.coordinator import RECORD_KEY_FILE, _CheckpointKeeper, _keep_schedule
from dalle_together.swarm.definition import fetch_definition, publish_definition
from dalle_together.swarm.dht import load_record_key, local_public_key, start_dht, visible_maddrs
from dalle_together.swarm.optimizer import _make_scheduler
from dalle_together.swarm.records import (
    MAX_SCHEDULE_SEGMENTS,
    DefinitionRecord,
    definition_key,
    read_entries,
    run_validators,
    schedule_key,
)
from dalle_together.swarm.schedule import (
    ScheduleFitter,
    ScheduleFollower,
    Segment,
    SwarmSchedule,
    publish_schedule,
    read_schedule,
)
from dalle_together.swarm.volunteer import follow_schedule

RUN = "schedule-test"
OPTIM = dataclasses.replace(preset("tiny").optim, warmup_steps=40, total_steps=3000, min_lr_ratio=0.1)


def test_the_first_fit_ends_the_cosine_at_the_deadline_at_the_measured_pace():
    fitter = ScheduleFitter(schedule=SwarmSchedule(OPTIM), deadline=310.0, fit_after_epochs=20, skip_epochs=2)
    # the swarm gathers at epoch 0 for 10 s (volunteers downloading state), then 2 epochs a second
    assert not fitter.observe(0, 0.0)
    assert not fitter.observe(0, 10.0)
    assert not fitter.observe(1, 10.9)  # a slow first epoch, left out of the pace
    for t in range(1, 11):
        assert not fitter.observe(2 * t, 10.0 + t)  # the clock starts at epoch 2, at 11 s
    assert fitter.observe(22, 21.0)
    # 20 epochs in 10 s, 289 s left; it applies 10 s of epochs ahead, at epoch 43 (warm-up ends at 40)
    (segment,) = fitter.schedule.segments
    assert segment == Segment(from_epoch=43, total_steps=22 + 2 * 289, start_progress=pytest.approx(3 / 2960))


def test_a_refit_follows_a_changed_pace_without_a_jump_in_the_learning_rate():
    fitter = ScheduleFitter(
        schedule=SwarmSchedule(OPTIM), deadline=600.0, fit_after_epochs=20, skip_epochs=0, refit_s=30.0
    )
    fitter.observe(0, 0.0)
    assert fitter.observe(20, 10.0)  # 2 epochs/s: the cosine ends at 20 + 2 * 590 = 1200
    assert fitter.schedule.segments[-1].total_steps == 1200
    assert not fitter.observe(60, 29.0)  # a refit waits 30 s
    assert not fitter.observe(80, 40.0)  # still 2 epochs/s: the schedule stands
    # a volunteer leaves: 1 epoch/s from now on
    assert fitter.observe(110, 70.0)
    first, second = fitter.schedule.segments
    assert second.from_epoch == 110 + 10 + 1 and second.total_steps == 110 + 530
    schedule = fitter.schedule
    before, after = schedule.multiplier(second.from_epoch - 1), schedule.multiplier(second.from_epoch)
    step_before = schedule.multiplier(second.from_epoch - 2) - before
    assert abs(after - before) < 2 * abs(step_before) < 1e-3  # the same curve goes on, only slower
    assert schedule.multiplier(second.total_steps) == pytest.approx(OPTIM.min_lr_ratio)
    assert schedule.multiplier(second.total_steps - 50) > OPTIM.min_lr_ratio + 0.01
    assert not fitter.observe(540, 591.0)  # too late for a change to matter


def test_a_fit_never_applies_before_warm_up_ends_nor_ends_before_it_applies():
    slow = ScheduleFitter(schedule=SwarmSchedule(OPTIM), deadline=600.0, fit_after_epochs=2, skip_epochs=0)
    slow.observe(0, 0.0)
    assert slow.observe(2, 20.0)
    assert slow.schedule.segments[0].from_epoch == 40
    late = ScheduleFitter(
        schedule=SwarmSchedule(OPTIM), deadline=25.0, fit_after_epochs=2, skip_epochs=0, lead_s=2.0
    )
    late.observe(100, 0.0)
    assert late.observe(120, 20.0)  # 1 epoch/s, 5 s left: from epoch 123 (2 s ahead), ends at 125
    assert late.schedule.segments[0].total_steps == 125
    slow = ScheduleFitter(
        schedule=SwarmSchedule(OPTIM), deadline=45.0, fit_after_epochs=2, skip_epochs=0, lead_s=2.0
    )
    slow.observe(100, 0.0)
    assert slow.observe(102, 40.0)  # 0.05 epochs/s, 5 s left: it applies at 104 and ends at once
    assert slow.schedule.segments[0] == Segment(
        from_epoch=104, total_steps=105, start_progress=pytest.approx(64 / 2960)
    )


def test_a_long_run_keeps_refitting_with_only_the_segments_that_still_matter():
    fitter = ScheduleFitter(
        schedule=SwarmSchedule(OPTIM), deadline=1e6, fit_after_epochs=20, skip_epochs=0, refit_s=30.0
    )
    fitter.observe(0, 0.0)
    epoch, now, fits = 0, 0.0, 0
    for i in range(400):  # the pace alternates between 1 and 2 epochs/s every 30 s
        epoch, now = epoch + (30 if (i // 2) % 2 else 15), now + 15.0
        fits += fitter.observe(epoch, now)
    assert fits > 150
    segments = fitter.schedule.segments
    assert len(segments) <= MAX_SCHEDULE_SEGMENTS
    assert segments[1].from_epoch > epoch - 20 > segments[0].from_epoch  # the oldest one still decides
    assert [s.from_epoch for s in segments] == sorted({s.from_epoch for s in segments})


def test_a_jump_in_the_epoch_seen_restarts_the_measurement():
    fitter = ScheduleFitter(schedule=SwarmSchedule(OPTIM), deadline=600.0, fit_after_epochs=20, skip_epochs=0)
    fitter.observe(10, 0.0)
    # a restarted coordinator learns that the swarm is at epoch 500: not 490 epochs in a second
    assert not fitter.observe(500, 1.0)
    assert fitter.observe(520, 21.0)
    assert fitter.schedule.segments[0].total_steps == 520 + 579  # 1 epoch/s, not 510 epochs/21 s


def test_the_scheduler_follows_the_segments():
    cfg = dataclasses.replace(OPTIM, warmup_steps=4, total_steps=100)
    schedule = SwarmSchedule(cfg)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    scheduler = _make_scheduler(optimizer, schedule=schedule)
    schedule.segments = (Segment(from_epoch=10, total_steps=20, start_progress=0.0),)
    multipliers = []
    for epoch in range(1, 25):
        optimizer.step()
        scheduler.step()
        multipliers.append((epoch, scheduler.get_last_lr()[0] / cfg.lr))
    for epoch, multiplier in multipliers:
        expected = lr_multiplier(epoch, cfg) if epoch < 10 else lr_multiplier(epoch - 6, cfg, total_steps=14)
        assert multiplier == pytest.approx(expected), epoch
    assert multipliers[-1][1] == pytest.approx(cfg.min_lr_ratio)  # the fitted cosine has ended


@pytest.mark.timeout(60)
def test_volunteers_follow_only_the_definition_publisher_s_schedule(start_peer):
    coordinator = start_peer(RUN)
    volunteer = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    impostor = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    publisher = local_public_key(coordinator)
    assert read_schedule(volunteer, RUN, publisher=publisher) is None

    fitted = (Segment(from_epoch=40, total_steps=300, start_progress=0.0),)
    assert publish_schedule(coordinator, RUN, fitted)
    assert publish_schedule(impostor, RUN, [Segment(from_epoch=0, total_steps=5, start_progress=0.5)])
    schedule = SwarmSchedule(OPTIM)
    follower = ScheduleFollower(volunteer, RUN, publisher=publisher, schedule=schedule, poll_s=0.2)
    start_peer.on_shutdown(follower.stop)
    assert schedule.segments == fitted  # read before the constructor returns: before a joiner's first step
    assert schedule.total_steps(39) == 3000 and schedule.total_steps(40) == 300

    # a refit reaches the follower within a few polls
    refitted = (*fitted, Segment(from_epoch=60, total_steps=280, start_progress=0.1))
    assert publish_schedule(coordinator, RUN, refitted)
    deadline = time.monotonic() + 10
    while schedule.segments != refitted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert schedule.segments == refitted

    # the schema refuses a schedule that is no schedule
    for bad in (
        [],
        [
            {"from_epoch": 50, "total_steps": 90, "start_progress": 0.0},
            {"from_epoch": 40, "total_steps": 80, "start_progress": 0.0},
        ],
        [{"from_epoch": 0, "total_steps": 0, "start_progress": 0.0}],
        [{"from_epoch": 0, "total_steps": 10, "start_progress": 1.5}],
    ):
        record = {"segments": bad, "time": get_dht_time()}
        assert not impostor.store(
            schedule_key(RUN), record, get_dht_time() + 60, subkey=local_public_key(impostor)
        )


@pytest.mark.timeout(60)
def test_volunteers_follow_a_schedule_only_if_the_coordinator_fits_one(start_peer, tmp_path):
    coordinator = start_peer(RUN)
    volunteer = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    cfg, files = preset("tiny"), {"vqvae.json": tmp_path / "vqvae.json"}
    files["vqvae.json"].write_text("{}")

    publish_definition(coordinator, RUN, cfg, files, expiration_s=60)  # a run of --total-steps
    definition = fetch_definition(volunteer, RUN, timeout_s=10)
    assert not definition.fitted_schedule
    assert follow_schedule(volunteer, definition, SwarmSchedule(cfg.optim)) is None
    # the definition of an older version, without the flag, is a run without a fitted schedule too
    [entry] = read_entries(volunteer, definition_key(RUN), DefinitionRecord).values()
    assert DefinitionRecord.parse_obj(entry.dict(exclude={"fitted_schedule"})).fitted_schedule is False

    # restarted with --schedule-minutes
    publish_definition(coordinator, RUN, cfg, files, expiration_s=60, fitted_schedule=True)
    fitted = (Segment(from_epoch=40, total_steps=300, start_progress=0.0),)
    assert publish_schedule(coordinator, RUN, fitted)
    definition = fetch_definition(volunteer, RUN, timeout_s=10)
    assert definition.fitted_schedule
    schedule = SwarmSchedule(cfg.optim)
    follower = follow_schedule(volunteer, definition, schedule)
    assert follower is not None
    start_peer.on_shutdown(follower.stop)
    assert schedule.segments == fitted


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_volunteers_keep_following_a_restarted_coordinator_s_schedule(start_peer, tmp_path):
    from test_swarm_training import mlp, swarm_cfg

    cfg = swarm_cfg()

    def start_coordinator(initial_peers=()):
        """What run_coordinator does: the record key kept in the run's directory."""
        dht = start_dht(
            initial_peers=initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=run_validators(RUN),
            record_key=load_record_key(tmp_path / RECORD_KEY_FILE),
        )
        stop_dht = start_peer.on_shutdown(dht.shutdown)
        keeper = _CheckpointKeeper(tmp_path, cfg)
        checkpointer = SwarmCheckpointer(
            dht=dht, run_id=RUN, model=mlp(seed=0), cfg=cfg, save=keeper.save, schedule=keeper.schedule
        )
        stop_checkpointer = start_peer.on_shutdown(checkpointer.shutdown)
        return dht, keeper, checkpointer, [stop_checkpointer, stop_dht]

    def keep_publishing(dht, keeper, checkpointer):
        stop = threading.Event()
        thread = threading.Thread(
            target=_keep_schedule, args=(dht, RUN, keeper, None, checkpointer, stop), daemon=True
        )
        thread.start()
        return start_peer.on_shutdown(lambda: (stop.set(), thread.join()))

    coordinator, keeper, checkpointer, stops = start_coordinator()
    first = (Segment(from_epoch=4, total_steps=30, start_progress=0.0),)
    keeper.set_segments(first)
    stops.insert(0, keep_publishing(coordinator, keeper, checkpointer))
    volunteer = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    schedule = SwarmSchedule(cfg.optim)
    follower = ScheduleFollower(
        volunteer, RUN, publisher=local_public_key(coordinator), schedule=schedule, poll_s=0.2
    )
    start_peer.on_shutdown(follower.stop)
    wait_for(lambda: schedule.segments == first, 10, "the volunteer did not follow the schedule")

    # a checkpoint at epoch 12, then a refit that no checkpoint has yet; then the coordinator stops
    optimizer_state = checkpointer.optimizer.state_dict()
    optimizer_state["state"].pop("local_epoch", None)
    keeper.save(checkpointer.model, 12, optimizer_state)
    second = (*first, Segment(from_epoch=14, total_steps=25, start_progress=0.25))
    keeper.set_segments(second)
    wait_for(lambda: schedule.segments == second, 10, "the volunteer did not follow the refit")
    key = local_public_key(coordinator)
    for stop in stops:
        stop()

    # restarted, it signs with the same key, resumes the newest schedule (not the checkpoint's),
    # and the volunteer that joined before the restart follows its next refit
    coordinator, keeper, checkpointer, _ = start_coordinator(initial_peers=visible_maddrs(volunteer))
    assert local_public_key(coordinator) == key
    assert keeper.restore(checkpointer) == 12
    assert keeper.segments == second
    third = (*second, Segment(from_epoch=20, total_steps=40, start_progress=0.5))
    keeper.set_segments(third)
    keep_publishing(coordinator, keeper, checkpointer)
    wait_for(
        lambda: schedule.segments == third, 10, "the volunteer lost the restarted coordinator's schedule"
    )


def test_the_record_key_is_kept_private_and_checked(tmp_path):
    path = tmp_path / "records.key"
    key = load_record_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_record_key(path).get_public_key().to_bytes() == key.get_public_key().to_bytes()
    path.write_bytes(b"not a key")
    with pytest.raises(UserError, match="not a private key"):
        load_record_key(path)
