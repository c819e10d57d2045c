"""``dalle-together`` commands (coordinator, join, status) running inside a testbed host."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from benchmarks.testbed.network import Host
from dalle_together.demo import CliProcess


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
        self.host = host
        super().__init__(name, args, echo=echo, env=env)

    def _start(self, argv: list[str], *, env: dict[str, str], cpus: set[int] | None) -> subprocess.Popen:
        # Host.popen prefixes `ip netns exec` and gives the command its own session
        return self.host.popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env
        )
