"""``dalle-together`` commands (coordinator, join, status) running inside a testbed host."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence

from benchmarks.testbed.network import Host
from dalle_together.demo import CHILD_ENV, CliProcess


class HostCli(CliProcess):
    """A :class:`~dalle_together.demo.CliProcess` whose command runs inside ``host``'s namespace.

    Everything else is CliProcess's: timestamped ``stdout``/``stderr`` lines, ``wait_for_stdout``,
    ``stop`` (SIGTERM, then SIGKILL) and ``kill`` (SIGKILL to it and all its processes at once).
    ``ip netns exec`` replaces itself with the command, so ``pid`` is the command's own.
    """

    def __init__(
        self,
        host: Host,
        name: str,
        args: Sequence[str],
        *,
        echo: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        # CliProcess.__init__ starts the command on this machine's network; this is the same
        # constructor with the command prefixed by `ip netns exec`
        self.name, self.args, self.echo, self.host = name, list(args), echo, host
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.proc = host.popen(
            [sys.executable, "-m", "dalle_together.cli", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**CHILD_ENV, **(env or {})},
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
