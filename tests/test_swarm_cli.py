"""The collaboration as its users run it: `coordinator`, `join` and `status` as real subprocesses on loopback.

Every peer is the real command line (its own DHT, p2p daemon and averagers); nothing is mocked.
The tiny preset trains with a small global batch so that epochs take a few seconds, and the
tokenizers come from the session's trained run instead of being trained again.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_fixtures import trained_run  # noqa: F401

from dalle_together.checkpoint import read_latest
from dalle_together.config import preset
from dalle_together.demo import ADDRESS, CHILD_ENV, CliProcess
from dalle_together.errors import UserError
from dalle_together.inference import load_bundle
from dalle_together.swarm.coordinator import CoordinatorOptions, settle_config

TARGET = 192
BATCH = 16
EPOCH_LINE = re.compile(r"epoch (\d+) \|")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NOBODY = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWQZzEWTyHjoBp75eRoaEpQbJq2HYQdxRfHXcmHXE4F3ay"  # discard port


def tiny_tokenizers(run_dir: Path, dest: Path) -> Path:
    """A coordinator directory holding the trained run's tokenizers, labelled as the tiny preset's.

    The session's run trained its VQ-VAE with fewer steps than the preset says; the network is the
    same, and a coordinator refuses a tokenizer whose configuration differs from its preset's.
    """
    from dalle_together.tokenizers.text import TextTokenizer
    from dalle_together.tokenizers.vqvae import load_vqvae, save_vqvae

    dest.mkdir(parents=True, exist_ok=True)
    TextTokenizer.load(run_dir).save(dest)
    vqvae = load_vqvae(run_dir)
    vqvae.cfg = preset("tiny").vq
    save_vqvae(vqvae, dest)
    return dest


def start_coordinator(run_dir: Path, run_id: str = "cli-test", *extra: str) -> CliProcess:
    return CliProcess(
        "coordinator",
        [
            "coordinator",
            "--run-id", run_id,
            "--checkpoint-dir", str(run_dir),
            "--host-maddrs", LOOPBACK,
            "--target-batch-size", str(TARGET),
            "--matchmaking-time", "1.0",
            "--status-every", "2",
            *extra,
        ],
        echo=False,
    )  # fmt: skip


def start_volunteer(
    address: str, name: str, cache: Path, *extra: str, run_id: str = "cli-test"
) -> CliProcess:
    return CliProcess(
        name,
        [
            "join",
            "--initial-peers", address,
            "--run-id", run_id,
            "--name", name,
            "--batch-size", str(BATCH),
            "--threads", "1",
            "--host-maddrs", LOOPBACK,
            "--cache-dir", str(cache / name),
            "--report-every", "2",
            *extra,
        ],
        echo=False,
    )  # fmt: skip


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dalle_together.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=CHILD_ENV,
    )


def log(peer: CliProcess) -> str:
    return "\n".join(line for _, line in peer.stderr)


def latest_epoch(peer: CliProcess) -> int:
    epochs = [int(m.group(1)) for _, line in peer.stderr if (m := EPOCH_LINE.search(line))]
    return max(epochs, default=-1)


def wait_until(condition, timeout_s: float, what: str, *peers: CliProcess) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        for peer in peers:
            assert peer.proc.poll() is None, f"{peer.name} exited early:\n{log(peer)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n\n".join(
            f"--- {p.name}\n{log(p)}" for p in peers
        )
        time.sleep(0.5)
    print(f"{time.strftime('%H:%M:%S')} {what}: {time.monotonic() - started:.1f} s")


def assert_left_cleanly(peer: CliProcess) -> None:
    assert peer.stop(timeout_s=90) == 0, f"{peer.name} did not exit cleanly:\n{log(peer)}"
    assert "Traceback" not in log(peer), log(peer)


def checkpoint_epoch(run_dir: Path) -> int:
    latest = read_latest(run_dir)
    return -1 if latest is None else json.loads((latest / "state.json").read_text())["step"]


def peer_id(address: str) -> str:
    return address.rsplit("/p2p/", 1)[1]


@pytest.mark.system
@pytest.mark.timeout(300)
def test_volunteers_survive_a_killed_peer_and_a_restarted_coordinator_resumes(trained_run, tmp_path):  # noqa: F811
    run_dir = tiny_tokenizers(trained_run, tmp_path / "coordinator")
    # local updates, as in `make demo` (the other tests here run the preset's delayed gradient rounds)
    coordinator = start_coordinator(run_dir, "cli-test", "--checkpoint-every-epochs", "2", "--local-updates")
    address = coordinator.wait_for_stdout(ADDRESS, timeout_s=60)
    alice = start_volunteer(address, "alice", tmp_path)
    bob = start_volunteer(address, "bob", tmp_path)
    peers = (coordinator, alice, bob)

    # both train the same model: each reaches epoch 2, which takes both of their samples
    wait_until(lambda: min(latest_epoch(alice), latest_epoch(bob)) >= 2, 120, "two epochs", *peers)
    assert "joined run 'cli-test' (tiny) at epoch 0" in log(alice)

    status = cli("status", "--initial-peers", address, "--run-id", "cli-test", "--json")
    assert status.returncode == 0, status.stderr
    assert len(status.stdout.strip().splitlines()) == 1  # one JSON object on stdout
    summary = json.loads(status.stdout)
    by_name = {p["name"]: p for p in summary["peers"]}
    assert set(by_name) == {"alice", "bob"}, summary
    assert all(p["samples_total"] > 0 and p["device"] == "cpu" for p in by_name.values()), summary
    assert summary["epoch"] >= 2 and summary["target_batch_size"] == TARGET and summary["preset"] == "tiny"

    # bob's machine vanishes mid-training (its DHT, averagers and p2p daemon with it): alice goes on
    bob.kill()
    killed_at = latest_epoch(alice)
    wait_until(lambda: latest_epoch(alice) >= killed_at + 2, 120, "epochs after the kill", coordinator, alice)
    wait_until(lambda: checkpoint_epoch(run_dir) >= 2, 30, "a checkpoint", coordinator, alice)

    # the coordinator stops first (saving the swarm's latest state on its way out), then alice
    assert_left_cleanly(coordinator)
    assert_left_cleanly(alice)
    assert "left run 'cli-test'" in log(alice)
    saved = checkpoint_epoch(run_dir)
    assert saved >= killed_at + 2, (saved, killed_at)  # the latest state, not the last periodic save
    bundle = load_bundle(run_dir)  # what `generate` and `evaluate` load
    assert bundle.state["step"] == saved and bundle.cfg.optim.target_batch_size == TARGET
    assert bundle.cfg.swarm.local_updates
    assert not bundle.cfg.swarm.delay_optimizer_step and not bundle.cfg.swarm.delay_grad_averaging

    # restarted, it keeps its peer id (the volunteers' address stays valid) and resumes the epoch count
    coordinator = start_coordinator(run_dir, "cli-test", "--checkpoint-every-epochs", "2")
    again = coordinator.wait_for_stdout(ADDRESS, timeout_s=60)
    assert peer_id(again) == peer_id(address)
    wait_until(lambda: "resumed from" in log(coordinator), 30, "the resume message", coordinator)
    assert f"resumed from the checkpoint of epoch {saved}" in log(coordinator)
    carol = start_volunteer(again, "carol", tmp_path)
    wait_until(lambda: "joined run" in log(carol), 90, "carol to join", coordinator, carol)
    assert f"at epoch {saved} " in log(carol), log(carol)
    wait_until(lambda: checkpoint_epoch(run_dir) >= saved + 2, 90, "the next checkpoint", coordinator, carol)
    assert_left_cleanly(carol)
    assert_left_cleanly(coordinator)


@pytest.mark.system
@pytest.mark.timeout(300)
def test_a_coordinator_killed_mid_run_rejoins_its_volunteers_and_keeps_saving(trained_run, tmp_path):  # noqa: F811
    run_dir = tiny_tokenizers(trained_run, tmp_path / "coordinator")
    coordinator = start_coordinator(run_dir, "cli-test", "--checkpoint-every-epochs", "2")
    address = coordinator.wait_for_stdout(ADDRESS, timeout_s=60)
    alice = start_volunteer(address, "alice", tmp_path)
    wait_until(lambda: checkpoint_epoch(run_dir) >= 2, 120, "a checkpoint", coordinator, alice)

    # the coordinator's machine dies while alice trains on; it comes back on another port (alice
    # knows only its old address, and forgot it as a DHT peer when it stopped answering)
    coordinator.kill()
    killed_at = latest_epoch(alice)
    wait_until(lambda: latest_epoch(alice) >= killed_at + 1, 60, "an epoch without the coordinator", alice)
    coordinator = start_coordinator(run_dir, "cli-test", "--checkpoint-every-epochs", "2")
    again = coordinator.wait_for_stdout(ADDRESS, timeout_s=60)
    assert again != address
    wait_until(lambda: "reconnected to 1 of" in log(coordinator), 60, "the reconnection", coordinator, alice)

    # it finds alice again by itself: it downloads her newer state and saves it, and `status` sees her
    restarted_at = latest_epoch(alice)
    wait_until(
        lambda: checkpoint_epoch(run_dir) >= restarted_at,
        90,
        "a checkpoint after the restart",
        coordinator,
        alice,
    )
    status = cli("status", "--initial-peers", again, "--run-id", "cli-test", "--json")
    assert status.returncode == 0, status.stderr
    assert [p["name"] for p in json.loads(status.stdout)["peers"]] == ["alice"], status.stdout
    assert_left_cleanly(alice)
    assert_left_cleanly(coordinator)


@pytest.fixture(scope="module")
def running_coordinator(trained_run, tmp_path_factory):  # noqa: F811
    run_dir = tiny_tokenizers(trained_run, tmp_path_factory.mktemp("errors") / "coordinator")
    coordinator = start_coordinator(run_dir, "cli-errors")
    try:
        yield coordinator.wait_for_stdout(ADDRESS, timeout_s=60)
    finally:
        coordinator.stop()


def assert_one_line_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert words in lines[0], lines[0]


@pytest.mark.system
@pytest.mark.timeout(120)
def test_joiners_that_cannot_join_get_one_line_and_exit_2(running_coordinator, tmp_path):
    cache = str(tmp_path / "cache")
    cases = {
        "unknown run": (
            ["join", "--initial-peers", running_coordinator, "--run-id", "nobody-runs-this", "--cache-dir", cache],
            "no peer serves run 'nobody-runs-this'",
        ),
        "status of an unknown run": (
            ["status", "--initial-peers", running_coordinator, "--run-id", "nobody-runs-this", "--timeout", "3"],
            "no peer serves run 'nobody-runs-this'",
        ),
        "another preset": (
            ["join", "--initial-peers", running_coordinator, "--run-id", "cli-errors", "--preset", "small",
             "--cache-dir", cache],
            "trains the 'tiny' preset, not 'small'",
        ),
        "a batch bigger than the global one": (
            ["join", "--initial-peers", running_coordinator, "--run-id", "cli-errors", "--batch-size", "4096",
             "--cache-dir", cache],
            f"exceeds the run's target batch size {TARGET}",
        ),
        "nobody at the address": (
            ["join", "--initial-peers", NOBODY, "--run-id", "cli-errors", "--cache-dir", cache],
            "none of the initial peers answered",
        ),
    }  # fmt: skip
    # all at once: each waits on the network, not on the CPU
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dalle_together.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=90)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        try:
            assert_one_line_error(result, cases[name][1])
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["join", "--initial-peers", "garbage", "--run-id", "r"],
            "initial peer 'garbage' is not a valid multiaddr",
        ),
        (
            ["status", "--initial-peers", "/ip4/127.0.0.1/tcp/31337", "--run-id", "r"],
            "lacks its /p2p/<peer id>",
        ),
        (["join", "--initial-peers", NOBODY, "--run-id", "no spaces"], "run id 'no spaces' is not valid"),
        (["join", "--initial-peers", NOBODY, "--run-id", "r", "--compression", "zip"], "unknown compression"),
        (
            ["join", "--initial-peers", NOBODY, "--run-id", "r", "--nice", "20"],
            "--nice must be between 0 and 19",
        ),
        (
            [
                "coordinator",
                "--run-id",
                "r",
                "--checkpoint-dir",
                "/nonexistent/x",
                "--local-updates",
                "--delayed-updates",
            ],
            "--local-updates applies every update at once",
        ),  # fmt: skip
    ],
)
def test_malformed_options_are_one_line_errors(args, words):
    assert_one_line_error(cli(*args), words)


def test_initial_peers_take_several_addresses_after_one_flag():
    from dalle_together.cli import _expand_multi_value_options

    assert _expand_multi_value_options(["join", "--initial-peers", "/a", "/b", "--run-id", "r"]) == [
        "join", "--initial-peers", "/a", "--initial-peers", "/b", "--run-id", "r",
    ]  # fmt: skip


def test_a_restarted_coordinator_follows_its_directory(tmp_path):
    options = CoordinatorOptions(
        run_id="r", checkpoint_dir=tmp_path, overrides={"optim.target_batch_size": 512}
    )
    cfg = settle_config(options)
    assert cfg.preset == "tiny" and cfg.optim.target_batch_size == 512
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "swarm.json").write_text(json.dumps({"run_id": "r"}))

    # no options: the stored run; coordinator-only options may change; run-defining ones may not
    assert settle_config(CoordinatorOptions(run_id="r", checkpoint_dir=tmp_path)) == cfg
    more_often = CoordinatorOptions(
        run_id="r", checkpoint_dir=tmp_path, overrides={"swarm.checkpoint_every_epochs": 1}
    )
    assert settle_config(more_often).swarm.checkpoint_every_epochs == 1
    with pytest.raises(UserError, match="defined with optim.target_batch_size = 512, but you asked for 64"):
        settle_config(
            CoordinatorOptions(run_id="r", checkpoint_dir=tmp_path, overrides={"optim.target_batch_size": 64})
        )
    with pytest.raises(UserError, match="holds a run of preset 'tiny', not 'small'"):
        settle_config(CoordinatorOptions(run_id="r", checkpoint_dir=tmp_path, preset_name="small"))
    with pytest.raises(UserError, match="belongs to run 'r', not 'other'"):
        settle_config(CoordinatorOptions(run_id="other", checkpoint_dir=tmp_path))


def test_the_remembered_peers_are_only_a_hint(tmp_path):
    """A damaged peers file costs the reconnection after a restart, never the restart itself."""
    from dalle_together.swarm.coordinator import PEERS_FILE, _remembered_peers

    assert _remembered_peers(tmp_path) == []
    (tmp_path / PEERS_FILE).write_text("{half a fi")
    assert _remembered_peers(tmp_path) == []
    (tmp_path / PEERS_FILE).write_text(json.dumps({"peers": [NOBODY, "/ip4/x/p2p/y", 7, LOOPBACK]}))
    assert _remembered_peers(tmp_path) == [NOBODY]


def test_a_volunteer_computes_at_a_lower_priority_than_hivemind_s_threads_and_processes():
    """Only the thread that calls it (the training loop) and what it starts afterwards are nicer."""
    import os
    import threading

    from dalle_together.swarm.volunteer import lower_this_thread_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def training_loop():
        lower_this_thread_priority(5)
        seen["computing"] = os.getpriority(os.PRIO_PROCESS, 0)
        child = threading.Thread(
            target=lambda: seen.setdefault("started_later", os.getpriority(os.PRIO_PROCESS, 0))
        )
        child.start()
        child.join()

    thread = threading.Thread(target=training_loop)
    thread.start()
    thread.join()
    assert seen == {"computing": min(before + 5, 19), "started_later": min(before + 5, 19)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # hivemind's side, started before, is untouched
