"""N hosts, each in its own network namespace, on capped links to one bridge.

    with Testbed(num_hosts=3, rate_mbit=100, rates={2: 10}) as tb:
        server = tb.hosts[0].popen(["python", "-m", "http.server", "--bind", tb.hosts[0].address])
        tb.hosts[1].run(["curl", f"http://{tb.hosts[0].address}:8000/"])

The layout, for a testbed whose namespaces are named ``dtb7-*`` (``7`` is its number, unique on
this machine among live testbeds with the same prefix)::

    dtb7-h0 [eth0 10.213.7.1/24, tbf] --veth-- [h0, tbf] ┐
    dtb7-h1 [eth0 10.213.7.2/24, tbf] --veth-- [h1, tbf] ┼ br0   (in namespace dtb7-br)
    ...                                                  ┘

The bridge lives in a namespace of its own, so nothing is added to the machine's own network: the
root namespace sees no new interface, route or address, and the hosts can reach only each other.
Each link is capped in both directions: tbf on the host's ``eth0`` shapes what the host sends
(its uplink), tbf on the bridge's end of the veth shapes what it receives (its downlink).

Everything the testbed makes (namespaces, hence the bridge and veths, and the processes started
in them) is removed when the ``with`` block ends, on an exception, on Ctrl-C or SIGTERM, and at
interpreter exit; :func:`cleanup_stale` removes what a killed run (SIGKILL, power loss) left.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dalle_together.processes import remove_orphaned_shared_memory, start_time

DEFAULT_PREFIX = "dtb"
SUBNET = "10.213"
"""Hosts of testbed number ``X`` get ``10.213.X.(i+1)/24``. Each testbed's bridge is in its own
namespace, so even equal addresses in two testbeds could not collide; the number only keeps them
apart in logs."""

REPO_ROOT = Path(__file__).resolve().parents[2]

STATE_DIR = Path("/tmp/dalle-together-testbed")
"""One ``<testbed name>.owner`` file per live testbed (the owner's pid and start time), and the lock
that serialises choosing a testbed number."""

MTU = 1500
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUEUE_LATENCY_MS = 50
"""The most a packet waits in a tbf queue: like a home router's buffer (a deep one would add
seconds of delay under load, a shallow one drops bursts a real link absorbs)."""


def _burst_bytes(rate_mbit: float) -> int:
    """tbf's bucket: at least the traffic of 4 ms at ``rate_mbit`` (tbf refills it on a timer, and a
    bucket smaller than one timer period's worth of bytes caps the rate below what was asked) and
    at least ten full-size frames, so a single TCP burst is not dropped at low rates."""
    return max(int(rate_mbit * 1e6 / 8 * 0.004), 10 * MTU)


class TestbedError(RuntimeError):
    """A command that builds or changes the testbed failed; the message has its stderr."""

    __test__ = False  # not a pytest test class, despite the name


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _command(["ip", *args], check=check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _command(["tc", *args], check=check)


def _command(argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode:
        raise TestbedError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.returncode}")
    return result


def available_congestion_controls() -> list[str]:
    """The TCP congestion controls this kernel offers (built in or loaded)."""
    return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()


def list_namespaces() -> list[str]:
    """Names of all network namespaces on this machine (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


@dataclass
class Host:
    """One test host: a network namespace with one link to the bridge."""

    index: int
    namespace: str
    address: str
    testbed: Testbed = field(repr=False)

    @property
    def maddr(self) -> str:
        """The multiaddress a hivemind peer on this host listens on (any free TCP port)."""
        return f"/ip4/{self.address}/tcp/0"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in this host; the testbed stops it (with its whole session) when it closes.

        The process gets a session of its own, so a terminal's Ctrl-C reaches only the testbed's owner,
        which then stops it in order. Keyword arguments go to :class:`subprocess.Popen`.
        """
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.testbed._processes.append(proc)
        return proc

    def fork(self, target: Callable[[], object], *, stderr: Path) -> ForkedProcess:
        """Run ``target()`` in a child forked from this process into this host's namespace, with text
        pipes for its stdin and stdout and ``stderr`` written to a file; the testbed stops it (and
        its session) when it closes, like :meth:`popen`'s.

        Many peers are cheaper this way than as new interpreters: the children share the pages of
        the modules this process imported (torch and hivemind: ~280 MB a peer) until they write to
        them. Import what the peers need before forking, and run no torch work here before that
        (the children would inherit a thread pool they cannot use).
        """
        sys.stdout.flush()
        sys.stderr.flush()
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        namespace = os.open(f"/var/run/netns/{self.namespace}", os.O_RDONLY)
        parent_ends = [stdin_write, stdout_read, *self.testbed._forked_fds]
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # not the testbed's handlers
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                _setns_network(namespace)
                log = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                for fd, target_fd in ((stdin_read, 0), (stdout_write, 1), (log, 2)):
                    os.dup2(fd, target_fd)
                for fd in (stdin_read, stdout_write, log, namespace, *parent_ends):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's whole life
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                target()
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in (stdin_read, stdout_write, namespace):
            os.close(fd)
        self.testbed._forked_fds += [stdin_write, stdout_read]
        stdin = open(stdin_write, "w", buffering=1)  # noqa: SIM115 - owned by the process object
        stdout = open(stdout_read)  # noqa: SIM115
        proc = ForkedProcess(pid, stdin=stdin, stdout=stdout)
        self.testbed._processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host to completion (keyword arguments go to :func:`subprocess.run`)."""
        return subprocess.run(self.argv(argv), **kwargs)

    def cli(self, name: str, args: Sequence[str], *, echo: bool = False, env: dict[str, str] | None = None):
        """Start ``python -m dalle_together.cli ARGS`` in this host, with one torch thread, as a
        :class:`~benchmarks.testbed.cli.HostCli` (a :class:`~dalle_together.demo.CliProcess`): e.g.
        ``host.cli("v1", ["join", "--host-maddrs", host.maddr, ...])``; ``echo`` copies its output
        lines, prefixed by ``name``, to stderr."""
        from benchmarks.testbed.cli import HostCli  # imports dalle_together: only when used

        return HostCli(self, name, args, echo=echo, env=env)


class Testbed:
    """``num_hosts`` network namespaces joined by a bridge, each link capped with tbf both ways.

    :param num_hosts: how many hosts (namespaces) to create.
    :param rate_mbit: the default cap of every host's link, in Mbit/s, each direction.
    :param rates: per-host caps overriding ``rate_mbit``, e.g. ``{3: 10}`` for one slow host.
    :param name_prefix: namespaces are named ``<prefix><number>-h<i>`` and ``<prefix><number>-br``;
      :func:`cleanup_stale` with the same prefix removes them after a crash.
    :param congestion_control: the TCP congestion control of the hosts' connections to each other
      (``cubic``, ``reno``, ``bbr``: one of ``/proc/sys/net/ipv4/tcp_available_congestion_control``);
      ``None`` keeps this machine's default. Set on the hosts' route (``ip route ... congctl``),
      since a namespace may not change the sysctl.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        num_hosts: int,
        *,
        rate_mbit: float = 100.0,
        rates: Mapping[int, float] | None = None,
        name_prefix: str = DEFAULT_PREFIX,
        congestion_control: str | None = None,
    ) -> None:
        if num_hosts < 1 or num_hosts > 250:
            raise ValueError(f"num_hosts must be between 1 and 250, got {num_hosts}")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name_prefix):
            raise ValueError(f"name_prefix must be 1-8 lowercase letters and digits, got {name_prefix!r}")
        if rates and any(not 0 <= i < num_hosts for i in rates):
            raise ValueError(f"rates name hosts outside 0..{num_hosts - 1}: {sorted(rates)}")
        if congestion_control is not None:
            available = available_congestion_controls()
            if congestion_control not in available:
                raise ValueError(
                    f"congestion control {congestion_control!r} is not available here; "
                    f"choose one of {', '.join(available)}"
                )
        self.num_hosts, self.name_prefix = num_hosts, name_prefix
        self.congestion_control = congestion_control
        self.rates_mbit = [float((rates or {}).get(i, rate_mbit)) for i in range(num_hosts)]
        self.hosts: list[Host] = []
        self.name = ""
        self.bridge_namespace = ""
        self._processes: list[subprocess.Popen | ForkedProcess] = []
        self._forked_fds: list[int] = []
        """This process's ends of forked children's pipes: a later child closes its copies."""
        self._namespaces: list[str] = []
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Testbed:
        """Create the namespaces, bridge and capped links; on any failure, remove what was made."""
        _LIVE.add(self)
        self._install_signal_handlers()
        try:
            number = self._claim_number()
            self.bridge_namespace = f"{self.name}-br"
            self._add_namespace(self.bridge_namespace)
            _ip("-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_namespace, "link", "set", "br0", "up")
            for i in range(self.num_hosts):
                self.hosts.append(self._add_host(i, f"{SUBNET}.{number}.{i + 1}"))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process started in the hosts, then delete the namespaces (bridge and veths go
        with them). Idempotent; safe to call on a half-built testbed."""
        if self._closed:
            return
        self._closed = True
        # everything that ran in the hosts: whose shared memory to delete once they are gone
        started = {p.pid for p in self._processes} | {
            int(pid)
            for namespace in self._namespaces
            for pid in _ip("netns", "pids", namespace, check=False).stdout.split()
        }
        for proc in self._processes:
            _stop_session(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.01))
        for proc in self._processes:
            if proc.poll() is None:
                _stop_session(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for namespace in reversed(self._namespaces):
            _delete_namespace(namespace)
        # hivemind's peers share tensors through files in /dev/shm that a killed peer leaves behind
        remove_orphaned_shared_memory(min_age_s=0.0, creators=started)
        if self.name:
            (STATE_DIR / f"{self.name}.owner").unlink(missing_ok=True)
        self._restore_signal_handlers()
        _LIVE.discard(self)

    def _claim_number(self) -> int:
        """Choose the lowest number no live namespace of this prefix uses, under a machine-wide lock,
        and record this process as the owner (for :func:`cleanup_stale`)."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with open(STATE_DIR / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = {_testbed_name(ns, self.name_prefix) for ns in list_namespaces()}
            taken |= {p.name.removesuffix(".owner") for p in STATE_DIR.glob("*.owner")}
            for number in range(1, 255):
                name = f"{self.name_prefix}{number}"
                if name not in taken:
                    break
            else:
                raise TestbedError(f"all 254 testbed numbers of prefix {self.name_prefix!r} are in use")
            pid = os.getpid()
            (STATE_DIR / f"{name}.owner").write_text(json.dumps({"pid": pid, "start": start_time(pid)}))
            self.name = name
        return number

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def _add_host(self, index: int, address: str) -> Host:
        namespace, port = f"{self.name}-h{index}", f"h{index}"
        self._add_namespace(namespace)
        # created inside the bridge's namespace with its peer end moved straight into the host's:
        # the veth never appears in the root namespace, so its name cannot clash with anyone's
        _ip("-n", self.bridge_namespace, "link", "add", port, "mtu", str(MTU), "type", "veth",
            "peer", "name", "eth0", "netns", namespace)  # fmt: skip
        _ip("-n", self.bridge_namespace, "link", "set", port, "master", "br0")
        _ip("-n", self.bridge_namespace, "link", "set", port, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        if self.congestion_control:
            # the route the kernel made for the subnet, again, with the algorithm its connections use
            subnet = address.rsplit(".", 1)[0] + ".0/24"
            _ip("-n", namespace, "route", "replace", subnet, "dev", "eth0", "proto", "kernel", "scope", "link",
                "src", address, "congctl", self.congestion_control)  # fmt: skip
        host = Host(index=index, namespace=namespace, address=address, testbed=self)
        self._shape(host, self.rates_mbit[index], "add")
        return host

    # --- links ---------------------------------------------------------------------------------

    def _shape(self, host: Host, rate_mbit: float, verb: str) -> None:
        if rate_mbit <= 0:
            raise ValueError(f"a link's rate must be positive, got {rate_mbit} Mbit/s")
        tbf = ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(_burst_bytes(rate_mbit)),
               "latency", f"{QUEUE_LATENCY_MS}ms"]  # fmt: skip
        _tc("-n", host.namespace, "qdisc", verb, "dev", "eth0", *tbf)  # the host's uplink
        _tc("-n", self.bridge_namespace, "qdisc", verb, "dev", f"h{host.index}", *tbf)  # its downlink

    def set_rate(self, index: int, rate_mbit: float) -> None:
        """Cap host ``index``'s link at ``rate_mbit`` Mbit/s in each direction, from now on."""
        self._shape(self.hosts[index], rate_mbit, "change")
        self.rates_mbit[index] = rate_mbit

    def link_down(self, index: int) -> None:
        """Cut host ``index`` off: the bridge drops its frames both ways, as when a home's Internet
        connection fails beyond its router. The host's own interface stays up (its programs see no
        error, only silence), so connections live on if the link returns before they time out."""
        self._port_state(index, "0")  # disabled

    def link_up(self, index: int) -> None:
        """Reconnect host ``index`` after :meth:`link_down`."""
        self._port_state(index, "3")  # forwarding

    def _port_state(self, index: int, state: str) -> None:
        # `ip link set ... type bridge_slave state` is accepted but ignored by some kernels; `bridge` is not
        _command(["bridge", "-n", self.bridge_namespace, "link", "set", "dev", f"h{index}", "state", state],
                 check=True)  # fmt: skip

    def counters(self, index: int) -> dict[str, int]:
        """Bytes and packets host ``index`` has sent and received over its link so far (Ethernet frames,
        headers included, as counted by its ``eth0``)."""
        out = _ip("-n", self.hosts[index].namespace, "-j", "-s", "link", "show", "eth0").stdout
        stats = json.loads(out)[0]["stats64"]
        return {
            "tx_bytes": stats["tx"]["bytes"],
            "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"],
            "rx_packets": stats["rx"]["packets"],
            "tx_dropped": stats["tx"]["dropped"],
        }

    def tx_bytes(self, index: int) -> int:
        """Bytes host ``index`` has sent over its link so far (frames, headers included)."""
        return self.counters(index)["tx_bytes"]

    def rx_bytes(self, index: int) -> int:
        """Bytes host ``index`` has received over its link so far (frames, headers included)."""
        return self.counters(index)["rx_bytes"]

    def cpu_seconds(self, index: int) -> float:
        """CPU seconds (user + system) used so far by the processes now running in host ``index``."""
        total = 0.0
        for pid in _ip("netns", "pids", self.hosts[index].namespace, check=False).stdout.split():
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # ended meanwhile
            fields = text[text.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def measure_mbit(self, src: int, dst: int, *, seconds: float = 3.0, port: int = 5201) -> float:
        """TCP payload throughput from host ``src`` to host ``dst`` over ``seconds``, in Mbit/s (one
        stream; at a cap of R Mbit/s expect about 0.95 R: the rest is TCP/IP and Ethernet headers)."""
        tool = [sys.executable, "-m", "benchmarks.testbed.tcp_stream"]
        dst_address = self.hosts[dst].address
        receiver = self.hosts[dst].popen(
            [*tool, "receive", "--bind", dst_address, "--port", str(port)],
            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        if receiver.stdout.readline().strip() != "listening":
            raise TestbedError(f"the throughput receiver on host {dst} did not start")
        self.hosts[src].run(
            [*tool, "send", "--to", dst_address, "--port", str(port), "--seconds", str(seconds)],
            check=True, timeout=seconds + 30, cwd=REPO_ROOT,
        )  # fmt: skip
        result = json.loads(receiver.stdout.readline())
        receiver.wait(10)
        return result["mbit"]

    def measure_exchange(
        self,
        nbytes: int,
        *,
        port: int = 5202,
        timeout_s: float | None = None,
        connect_timeout_s: float = 30.0,
    ) -> float:
        """Seconds until every host has received ``nbytes`` from every other host, all sending to all
        at once over plain TCP (one connection per pair and direction): the traffic of an all-reduce
        that sends ``nbytes`` each way between every pair, without its protocol, the floor that TCP
        and these links leave it. ``timeout_s`` defaults to a minute plus four times what the
        slowest link needs, so that big exchanges on slow links are not cut short; ``connect_timeout_s``
        bounds each host's connecting to the others, not the transfer."""
        if timeout_s is None:
            slowest_s = nbytes * (len(self.hosts) - 1) * 8 / (min(self.rates_mbit) * 1e6)
            timeout_s = 60 + 4 * slowest_s
        tool = [sys.executable, "-m", "benchmarks.testbed.tcp_stream", "exchange", "--port", str(port)]
        tool += ["--addresses", ",".join(h.address for h in self.hosts), "--bytes", str(nbytes)]
        tool += ["--connect-timeout-s", str(connect_timeout_s)]
        procs = []
        for i, host in enumerate(self.hosts):
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
            procs.append(host.popen([*tool, "--me", str(i)], **pipes, text=True, cwd=REPO_ROOT))
        try:
            for i, proc in enumerate(procs):
                if proc.stdout.readline().strip() != "listening":
                    raise TestbedError(f"the exchange on host {i} did not start")
            start = time.time() + 0.5  # every host connects to the others before it
            for proc in procs:
                proc.stdin.write(f"go {start}\n")
                proc.stdin.flush()
            outputs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
            failed = [i for i, proc in enumerate(procs) if proc.returncode]
            if failed:
                raise TestbedError(f"the exchange failed on host(s) {failed}")
            seconds = [json.loads(out)["seconds"] for out in outputs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return max(seconds)

    # --- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """Turn SIGTERM and SIGHUP into SystemExit while the testbed is up, so ``with`` blocks unwind
        and remove it (SIGINT already raises KeyboardInterrupt). Only where nobody else handles them."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._previous_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            if signal.getsignal(sig) is _exit_on_signal and not any(tb is not self for tb in _LIVE):
                signal.signal(sig, handler)
        self._previous_handlers.clear()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class ForkedProcess:
    """A child made by :meth:`Host.fork`: the part of :class:`subprocess.Popen` the testbed and the
    benchmark peers use (``pid``, ``stdin``, ``stdout``, ``poll``, ``wait``, ``send_signal``, ``kill``)."""

    def __init__(self, pid: int, *, stdin: TextIO, stdout: TextIO) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _setns_network(fd: int) -> None:
    """Move the calling (single-threaded) process into the network namespace open at ``fd``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns failed")


def _stop_session(proc: subprocess.Popen | ForkedProcess, sig: int) -> None:
    """Signal the process group of ``proc`` (its own session, see :meth:`Host.popen`), or just it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _delete_namespace(namespace: str) -> None:
    """Kill whatever still runs in ``namespace`` (a process can leave its group, e.g. a daemon that
    started a session of its own, but not its namespace), then delete the namespace."""
    for _ in range(3):
        pids = _ip("netns", "pids", namespace, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
    _ip("netns", "del", namespace, check=False)


def _testbed_name(namespace: str, prefix: str) -> str | None:
    match = re.fullmatch(rf"({re.escape(prefix)}\d+)-(br|h\d+)", namespace)
    return match.group(1) if match else None


_LIVE: set[Testbed] = set()


@atexit.register
def _close_live_testbeds() -> None:
    for testbed in list(_LIVE):
        testbed.close()


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete the namespaces (and kill their processes) of testbeds with ``prefix`` whose owner
    process is gone: what a SIGKILLed or crashed run left behind. Live testbeds are left alone.
    Returns the deleted namespaces."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    removed = []
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for namespace in list_namespaces():
            name = _testbed_name(namespace, prefix)
            if name is not None and not _owner_alive(name):
                _delete_namespace(namespace)
                removed.append(namespace)
        for owner in STATE_DIR.glob(f"{prefix}*.owner"):
            name = owner.name.removesuffix(".owner")
            if re.fullmatch(rf"{re.escape(prefix)}\d+", name) and not _owner_alive(name):
                owner.unlink(missing_ok=True)
    return removed


def _owner_alive(name: str) -> bool:
    try:
        owner = json.loads((STATE_DIR / f"{name}.owner").read_text())
    except (OSError, ValueError):
        return False
    return start_time(owner["pid"]) == owner["start"]


def testbed_available() -> tuple[bool, str]:
    """Whether this machine can run a testbed, and if not, why (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return False, "the testbed needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            return False, f"the testbed needs `{tool}` (iproute2), which is not installed"
    probe = f"{DEFAULT_PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except TestbedError as error:
        return False, f"cannot create a network namespace: {error}"
    try:
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _tc("-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "10mbit", "burst", "16kb",
            "latency", "50ms")  # fmt: skip
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except TestbedError as error:
        return False, f"cannot build a capped, bridged link (veth, tbf, bridge): {error}"
    finally:
        _ip("netns", "del", probe, check=False)
    return True, "network namespaces, veth, bridge and tbf work"
