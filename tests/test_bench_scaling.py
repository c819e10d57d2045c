"""The scaling benchmark's bookkeeping: a time-dilated run reports the swarm's real-time numbers."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.bench_scaling import Setting, settings_for, summarise


def setting(dilation: float) -> Setting:
    return Setting(
        num_volunteers=2, rate_mbit=100.0, model_size="25M", epoch_s=30.0, base_step_s=4.0,
        batch_size=32, warmup_s=45.0, measure_s=120.0, time_dilation=dilation,
    )  # fmt: skip


def volunteer(index: int, dilation: float) -> dict:
    # over the 120 s window of the real swarm: epochs every 30 s, 90% of the time computing
    steps = int(120 / setting(1).step_s(index) * 0.9)
    return {
        "index": index, "speed": setting(1).speed(index), "utilisation": 0.9, "blocked_fraction": 0.1,
        "samples": steps * 32, "steps": steps, "start_epoch": 3, "end_epoch": 7,
        "epoch_times": [(1000.0 + k * 30.0 * dilation, 4 + k) for k in range(4)],
    }  # fmt: skip


@pytest.mark.parametrize("dilation", [1.0, 4.0])
def test_a_dilated_run_reports_real_time_rates(dilation):
    s = setting(dilation)
    results = [volunteer(i, dilation) for i in range(2)]
    wall_window = 120.0 * dilation
    r = summarise(
        s, results, cpu=[0.5 * wall_window, 0.5 * wall_window], tx=[int(150e6), int(150e6)],
        memory=[1000.0, 1000.0], orchestrator_mb=0.0, startup_s=1.0,
    )  # fmt: skip
    reference = summarise(
        setting(1.0), [volunteer(i, 1.0) for i in range(2)], cpu=[60.0, 60.0], tx=[int(150e6)] * 2,
        memory=[1000.0, 1000.0], orchestrator_mb=0.0, startup_s=1.0,
    )  # fmt: skip
    # the same swarm seen in real time, whatever the dilation
    for key in ("samples_per_s", "samples_over_ideal", "epoch_period_s", "sent_mbit_per_volunteer"):
        assert r[key] == pytest.approx(reference[key]), key
    assert r["epoch_period_s"] == pytest.approx(30.0)
    assert r["target_batch_size"] == s.target_batch_size == setting(1.0).target_batch_size
    # this machine's cores, in its own (wall) time: half a core each
    assert r["cpu_cores_all_volunteers"] == pytest.approx(1.0)


def test_the_full_grid_runs_16_volunteers_dilated():
    args = argparse.Namespace(
        full=True, volunteers=None, rate_mbit=None, model_size=None, epoch_seconds=None,
        time_dilation=None, base_step_s=4.0, batch_size=32, warmup_epochs=1.5, measure_epochs=4.0,
    )  # fmt: skip
    grid = settings_for(args)
    assert any(s.num_volunteers == 16 and s.time_dilation == 4.0 and s.rate_mbit == 100.0 for s in grid)
    assert all(s.wall_s(s.epoch_s) == s.epoch_s * s.time_dilation for s in grid)
