"""The network testbed: hosts in namespaces, capped links both ways, and nothing left behind.

Needs root and network namespaces; skips with the reason where the machine cannot make them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks.testbed import (
    Testbed,
    TestbedError,
    cleanup_stale,
    list_namespaces,
    network,
)
from benchmarks.testbed.network import REPO_ROOT

AVAILABLE, REASON = network.testbed_available()  # imported by name, pytest would collect it
pytestmark = [pytest.mark.system, pytest.mark.skipif(not AVAILABLE, reason=REASON)]
PREFIX = "dtbtest"  # apart from the benchmarks' "dtb", so a test never touches a benchmark's hosts


def ours() -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(PREFIX)]


def test_hosts_reach_each_other_and_everything_is_removed():
    with Testbed(3, name_prefix=PREFIX) as tb:
        assert sorted(ours()) == sorted([tb.bridge_namespace, *(h.namespace for h in tb.hosts)])
        assert len({h.address for h in tb.hosts}) == 3
        server = tb.hosts[0].popen(
            [sys.executable, "-c", "import socket, sys; s = socket.create_server((sys.argv[1], 7000)); "
             "print('up', flush=True); c, _ = s.accept(); c.sendall(b'hello'); c.close()", tb.hosts[0].address],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout.readline().strip() == "up"
        client = tb.hosts[2].run(
            [sys.executable, "-c", "import socket, sys; print(socket.create_connection((sys.argv[1], 7000), "
             "timeout=5).recv(5).decode())", tb.hosts[0].address],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert client.stdout.strip() == "hello"
        # the root namespace cannot reach the hosts: nothing was added to this machine's network
        assert (
            tb.hosts[0].address not in subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout
        )
        sleeper = tb.hosts[1].popen(["sleep", "600"])
    assert ours() == []
    assert sleeper.poll() is not None


def test_links_are_capped_both_ways():
    with Testbed(2, rate_mbit=50, rates={1: 10}, name_prefix=PREFIX) as tb:
        # a host's link is capped for what it sends and what it receives: 10 Mbit/s both ways
        # through host 1, and about 95% of the cap reaches the receiver as TCP payload (less on a
        # busy machine), within 15%: timestamps of a loaded receiver are noisy
        assert 7 <= tb.measure_mbit(0, 1, seconds=2) <= 11.5
        sent = tb.tx_bytes(1)
        assert 7 <= tb.measure_mbit(1, 0, seconds=2) <= 11.5
        assert tb.tx_bytes(1) - sent > 2 * 7e6 / 8  # the counters see the bytes sent
        tb.set_rate(1, 40)
        assert 28 <= tb.measure_mbit(0, 1, seconds=2) <= 46


def test_plain_tcp_exchange_moves_every_pair_s_bytes_through_the_capped_links():
    nbytes = 500_000  # to each other host: 1 MB up and 1 MB down per host
    with Testbed(3, rate_mbit=20, name_prefix=PREFIX) as tb:
        sent = [tb.tx_bytes(i) for i in range(3)]
        seconds = tb.measure_exchange(nbytes)
        # no faster than the cap allows (1 MB at 2.5 MB/s), and not far off it
        assert 0.4 <= seconds <= 1.0
        assert all(tb.tx_bytes(i) - sent[i] >= 2 * nbytes for i in range(3))
        tb.set_rate(2, 5)  # one slow host holds up the exchange: its 1 MB takes 1.6 s
        assert 1.6 <= tb.measure_exchange(nbytes) <= 3.5


def test_plain_tcp_exchange_outlasting_its_connect_timeout_still_finishes():
    # A socket's timeout bounds sendall's whole duration, so an exchange that kept its connect
    # timeout failed (and hung before f51e7c3) once a transfer took longer than that: 100M
    # parameters at 100 Mbit/s need 34 s against a 30 s timeout. The same here at a small scale:
    # 1 MB each way at 5 Mbit/s takes 1.6 s against a 0.5 s connect timeout.
    with Testbed(2, rate_mbit=5, name_prefix=PREFIX) as tb:
        assert 1.6 <= tb.measure_exchange(1_000_000, connect_timeout_s=0.5, timeout_s=30) <= 4.0


def test_hosts_use_the_congestion_control_asked_for():
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    others = [cc for cc in network.available_congestion_controls() if cc != default]
    if not others:
        pytest.skip(f"this kernel offers no congestion control but {default}")
    with pytest.raises(ValueError, match="not available"):
        Testbed(2, name_prefix=PREFIX, congestion_control="no-such-algorithm")
    with Testbed(2, name_prefix=PREFIX, congestion_control=others[0]) as tb:
        # both ends of a connection between two hosts: what each side's kernel sends with
        server = tb.hosts[0].popen(
            [sys.executable, "-c", "import socket, sys; s = socket.create_server((sys.argv[1], 7001)); "
             "print('up', flush=True); c, _ = s.accept(); "
             "print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).strip(b'\\0').decode())",
             tb.hosts[0].address],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout.readline().strip() == "up"
        client = tb.hosts[1].run(
            [sys.executable, "-c", "import socket, sys; c = socket.create_connection((sys.argv[1], 7001), timeout=5); "
             "print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).strip(b'\\0').decode())",
             tb.hosts[0].address],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert client.stdout.strip() == others[0]
        assert server.stdout.readline().strip() == others[0]


def test_link_down_silences_a_host_until_it_is_back():
    with Testbed(2, name_prefix=PREFIX) as tb:
        ping = [
            sys.executable,
            "-c",
            "import socket, sys; socket.create_connection((sys.argv[1], 9), timeout=1)",
        ]
        tb.link_down(1)
        # no answer at all (not even "refused"): the frames vanish
        down = tb.hosts[0].run([*ping, tb.hosts[1].address], capture_output=True, text=True, timeout=30)
        assert "timed out" in down.stderr
        tb.link_up(1)
        up = tb.hosts[0].run([*ping, tb.hosts[1].address], capture_output=True, text=True, timeout=30)
        assert "refused" in up.stderr  # host 1 answers again (nobody listens on port 9)


def test_failure_inside_the_block_or_while_building_removes_everything(monkeypatch):
    with pytest.raises(ZeroDivisionError), Testbed(2, name_prefix=PREFIX) as tb:
        tb.hosts[0].popen(["sleep", "600"])
        1 / 0  # noqa: B018
    assert ours() == []

    real_tc = network._tc

    def tc_failing_for_host_1(*args: str, check: bool = True):
        if "h1" in args:
            raise TestbedError("injected")
        return real_tc(*args, check=check)

    monkeypatch.setattr(network, "_tc", tc_failing_for_host_1)
    with pytest.raises(TestbedError, match="injected"), Testbed(3, name_prefix=PREFIX):
        pass
    assert ours() == []


def test_sigterm_and_crash_leave_nothing_behind():
    script = textwrap.dedent(f"""
        import sys, time
        from benchmarks.testbed import Testbed
        with Testbed(2, name_prefix={PREFIX!r}) as tb:
            tb.hosts[0].popen(["sleep", "600"])
            print("up", flush=True)
            time.sleep(600)
    """)

    def start() -> subprocess.Popen:
        owner = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        assert owner.stdout.readline().strip() == "up"
        assert len(ours()) == 3
        return owner

    owner = start()
    owner.send_signal(signal.SIGTERM)  # Ctrl-C or a supervisor stopping the run
    owner.wait(30)
    assert ours() == []

    owner = start()
    owner.send_signal(signal.SIGKILL)  # no chance to clean up: cleanup_stale does it later
    owner.wait(30)
    assert len(ours()) == 3
    with Testbed(1, name_prefix=PREFIX):  # a live testbed of the same prefix is left alone
        removed = cleanup_stale(PREFIX)
        assert len(removed) == 3 and len(ours()) == 2
    assert ours() == []


def test_cpu_seconds_counts_a_hosts_processes():
    with Testbed(1, name_prefix=PREFIX) as tb:
        busy = tb.hosts[0].popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        assert tb.cpu_seconds(0) > 0.3
        busy.kill()


def _echo_peer() -> None:
    """A forked benchmark peer: says its address, then answers each command with the host it runs on."""
    import json
    import socket

    addresses = subprocess.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True)
    address = addresses.stdout.split()[3].split("/")[0]  # there is an eth0 only inside a host
    socket.create_server((address, 0)).close()  # and its address is this process's own
    print(json.dumps({"address": address}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps({"echo": line.strip(), "address": address}), flush=True)


def test_forked_peers_run_in_their_hosts_and_are_stopped(tmp_path):
    from benchmarks.testbed.peers import PeerProcess, start_peers

    with Testbed(2, name_prefix=PREFIX) as tb:
        peers = start_peers(
            tb, lambda i, host, initial: PeerProcess.fork(host, _echo_peer, log=tmp_path / f"p{i}.log")
        )
        for peer, host in zip(peers, tb.hosts, strict=True):
            peer.send("hello")
            # each child moved into its own host's namespace: it has that host's address
            assert peer.answer(timeout_s=30) == {"echo": "hello", "address": host.address}
        peers[1].send("quit")
        assert peers[1].proc.wait(30) == 0
        lingering = peers[0].proc
    assert lingering.poll() is not None  # the testbed stopped the other one
    assert ours() == []
