"""An Internet-like testbed on one machine: hosts in network namespaces on capped links.

Shared by the benchmarks and the system tests. Needs root; :func:`testbed_available` says whether
this machine can run it, and why not.

    from benchmarks.testbed import Testbed, testbed_available

    with Testbed(num_hosts=3, rate_mbit=20) as tb:
        coordinator = tb.hosts[0].cli("coordinator", ["coordinator", "--host-maddrs", tb.hosts[0].maddr, ...])
        address = coordinator.wait_for_stdout(ADDRESS, timeout_s=120)
        tb.hosts[1].cli("v1", ["join", "--initial-peers", address, "--host-maddrs", tb.hosts[1].maddr, ...])
        tb.link_down(1); time.sleep(10); tb.link_up(1)
        print(tb.tx_bytes(1))
"""

from benchmarks.testbed.network import (
    DEFAULT_PREFIX,
    Host,
    Testbed,
    TestbedError,
    cleanup_stale,
    list_namespaces,
    testbed_available,
)

__all__ = [
    "DEFAULT_PREFIX",
    "Host",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "list_namespaces",
    "testbed_available",
]
