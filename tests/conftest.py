"""Shared test hygiene: no test leaves processes behind.

hivemind peers are processes (a DHT process, its p2pd daemon, one process per averager); a test
that fails half-way can leave them running and slow down or hang everything after it. After each
test we kill the descendants of the pytest process that appeared during that test, so processes
owned by longer-lived fixtures (started before the test) are left alone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dalle_together.processes import descendants, start_time


def _descendants(root: int) -> dict[int, int]:
    """Living descendants of ``root`` as {pid: start time}."""
    return {pid: stat.start_time for pid, stat in descendants(root).items()}


def _kill(procs: dict[int, int], sig: int) -> None:
    """Signal each process, by pid, unless it has ended and its pid was reused since we listed it."""
    for pid, started in procs.items():
        if start_time(pid) != started:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _is_shared_service(pid: int) -> bool:
    """torch's shared-memory manager is started once per process and serves every later test."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"torch_shm_manager")
    except OSError:
        return False


def _alive(procs: dict[int, int]) -> dict[int, int]:
    return {pid: t for pid, t in procs.items() if start_time(pid) == t}


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """After each test, end the processes it started and left running (p2pd daemons included)."""
    if not Path("/proc").is_dir():
        yield
        return
    before = _descendants(os.getpid())
    yield

    def new_processes() -> dict[int, int]:
        return {
            pid: t
            for pid, t in _descendants(os.getpid()).items()
            if before.get(pid) != t and not _is_shared_service(pid)
        }

    if not new_processes():
        return
    gc.collect()  # runs hivemind's __del__ shutdowns of DHTs and optimizers that went out of scope
    # list the whole tree before killing: a p2pd daemon outlives its DHT process and gets re-parented
    leftover = new_processes()
    if not leftover:
        return
    _kill(leftover, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and _alive(leftover):
        time.sleep(0.05)
    _kill(_alive(leftover), signal.SIGKILL)
    if "hivemind" in sys.modules:
        from hivemind.utils.mpfuture import MPFuture

        # a killed peer may have held MPFuture's cross-process locks; start them afresh
        MPFuture.reset_backend()


# --- swarm peers on loopback ------------------------------------------------------------------

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@pytest.fixture
def start_peer():
    """Start a DHT peer on loopback: ``start_peer(run_id, initial_peers=(), client_mode=False)``.

    Every peer (and whatever is registered with ``stop = start_peer.on_shutdown(fn)``) stops after
    the test, in reverse order, so optimizers go before the DHTs they use; ``stop()`` runs ``fn``
    earlier, once.
    """
    from dalle_together.swarm.dht import start_dht
    from dalle_together.swarm.records import run_validators

    cleanups = []

    def on_shutdown(fn):
        done = []

        def once():
            if not done:
                done.append(True)
                fn()

        cleanups.append(once)
        return once

    def start(run_id: str, *, initial_peers=(), client_mode: bool = False):
        dht = start_dht(
            initial_peers=list(initial_peers),
            host_maddrs=LOOPBACK,
            client_mode=client_mode,
            record_validators=run_validators(run_id),
        )
        on_shutdown(dht.shutdown)
        return dht

    start.on_shutdown = on_shutdown
    yield start
    for cleanup in reversed(cleanups):
        cleanup()
