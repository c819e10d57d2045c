"""Benchmark peers: one Python process per testbed host, driven by commands on stdin and answering
JSON lines on stdout (the averaging and scaling benchmarks' peers)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.testbed.network import ForkedProcess, Host, Testbed

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
"""One torch thread per peer: the peers share this machine's cores, as volunteers would not."""


class PeerProcess:
    """A peer in a testbed host: ``send`` it a command line, ``answer`` is its next JSON line."""

    def __init__(self, proc: subprocess.Popen | ForkedProcess, log: Path) -> None:
        self.proc, self.log = proc, log
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def spawn(
        cls, host: Host, module: str, args: list[str], *, log: Path, env: dict[str, str] | None = None
    ) -> PeerProcess:
        """``python -m MODULE ARGS`` in ``host``, with :data:`PEER_ENV` and ``env``."""
        proc = host.popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, bufsize=1,
            env={**os.environ, **PEER_ENV, **(env or {})}, cwd=REPO_ROOT,
        )  # fmt: skip
        return cls(proc, log)

    @classmethod
    def fork(cls, host: Host, target: Callable[[], object], *, log: Path) -> PeerProcess:
        """``target()`` in a child of this process in ``host`` (see :meth:`Host.fork`); this process
        must have been started with :data:`PEER_ENV`'s thread limits."""
        return cls(host.fork(target, stderr=log), log)

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.answers.put(json.loads(line))
        self.answers.put(None)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            message = self.answers.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no answer from a peer in {timeout_s} s; see {self.log}") from None
        if message is None:
            raise RuntimeError(f"a peer exited; see {self.log}:\n{self.log.read_text()[-3000:]}")
        return message

    def abandon(self) -> None:
        """Kill the peer without waiting for its output to end (its averagers may hold stdout open)."""
        self.proc.kill()
        self.answers.put(None)


def start_peers(
    tb: Testbed, start: Callable[[int, Host, str | None], PeerProcess], *, timeout_s: float = 300
) -> list[PeerProcess]:
    """One peer per host, ``start(index, host, initial_peer)``: peer 0 first, then the others,
    bootstrapping from the address peer 0 answers first (``{"address": ...}``); returns once every
    peer has answered its address."""
    peers: list[PeerProcess] = []
    initial_peer = None
    for i, host in enumerate(tb.hosts):
        peers.append(start(i, host, initial_peer))
        if i == 0:
            initial_peer = peers[0].answer(timeout_s=timeout_s)["address"]
    for peer in peers[1:]:
        peer.answer(timeout_s=timeout_s)
    return peers
