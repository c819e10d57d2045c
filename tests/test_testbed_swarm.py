"""Three real volunteers and a coordinator, each in its own network namespace on a 20 Mbit/s link.

The collaboration as on the Internet, minus the Internet: every peer is the real command line
(``dalle-together coordinator`` / ``join``), hosts reach each other only through capped links.
Checked from outside, as an operator could: all three volunteers contribute samples while the
epochs advance, and their states, downloaded from each one directly at the same epoch, hold the
same weights; they train on different data, so only averaging can make them agree.
"""

from __future__ import annotations

import json
import sys

import pytest
from run_fixtures import trained_run  # noqa: F401
from test_swarm_cli import tiny_tokenizers

import benchmarks.testbed as testbed  # not `testbed_available` itself: pytest would collect it
from benchmarks.bench_faults import AGREE_OVER_LR, RUN_ID, CliSwarm, SwarmSettings

VOLUNTEERS = 3
RATE_MBIT = 20.0
SETTINGS = SwarmSettings()
"""A run as designed (see :class:`SwarmSettings`): epochs of about 8 s, 2 s matchmaking."""


@pytest.mark.system
@pytest.mark.timeout(480)
def test_three_volunteers_on_capped_links_average_and_agree(trained_run, tmp_path):  # noqa: F811
    available, reason = testbed.testbed_available()
    if not available:
        pytest.skip(reason)
    tokenizers = tiny_tokenizers(trained_run, tmp_path / "tokenizers")
    probe_host = VOLUNTEERS + 1
    # the probe only observes: a fast link, so that downloading three states takes less than an epoch
    with testbed.Testbed(VOLUNTEERS + 2, rate_mbit=RATE_MBIT, rates={probe_host: 1000.0}) as tb:
        swarm = CliSwarm(tb, tmp_path / "coordinator", settings=SETTINGS, tokenizers=tokenizers)
        address = swarm.start_coordinator(timeout_s=90)
        for i in range(VOLUNTEERS):
            swarm.start_volunteer(i)
        swarm.wait(lambda: all(swarm.joined(i) for i in range(VOLUNTEERS)), 90, "three volunteers to join")
        swarm.wait(lambda: min(swarm.epoch(i) for i in range(VOLUNTEERS)) >= 3, 120, "three epochs")
        assert swarm.alive() == list(range(VOLUNTEERS)), swarm.log()

        status = tb.hosts[probe_host].run(
            [sys.executable, "-m", "dalle_together.cli", "status", "--initial-peers", address,
             "--run-id", RUN_ID, "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        contributed = {p["name"]: p["samples_total"] for p in summary["peers"]}
        assert set(contributed) == {f"v{i}" for i in range(VOLUNTEERS)}, summary
        assert all(samples > 0 for samples in contributed.values()), summary
        assert summary["epoch"] >= 3, summary

        probe = swarm.probe_agreement(range(VOLUNTEERS))
        same = probe["same_epoch"]
        assert same is not None, f"the volunteers never reported the same epoch: {probe['rounds']}"
        assert same["epoch"] >= 3, probe
        # one optimizer step moves the weights by about lr; fp16 averaging's rounding by far less
        assert max(same["rms_diff_over_lr"].values()) < AGREE_OVER_LR, probe

        statuses = swarm.stop_volunteers(range(VOLUNTEERS), timeout_s=60)
        assert all(status == 0 for status in statuses.values()), (statuses, swarm.log(0))
        assert swarm.coordinator.stop(timeout_s=60) == 0, swarm.log()
