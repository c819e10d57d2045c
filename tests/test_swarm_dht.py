"""Starting DHT peers: addresses volunteers can copy, and mistakes reported as one sentence."""

from __future__ import annotations

import re
import time

import pytest

from dalle_together.errors import UserError
from dalle_together.swarm.dht import start_dht, visible_maddrs

MADDR = re.compile(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/12D3KooW\w+$")
A_PEER_ID = "12D3KooWQZzEWTyHjoBp75eRoaEpQbJq2HYQdxRfHXcmHXE4F3ay"


@pytest.mark.timeout(60)
def test_second_peer_joins_through_the_first_ones_visible_address(start_peer):
    first = start_peer("run")
    addresses = visible_maddrs(first)
    assert addresses and all(MADDR.match(a) for a in addresses), addresses
    assert addresses[0].endswith(str(first.peer_id))

    second = start_peer("run", initial_peers=addresses, client_mode=True)
    assert second.client_mode
    assert second.store("k", "v", expiration_time=time.time() + 30)
    assert first.get("k", latest=True).value == "v"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(initial_peers=["garbage"]), "initial peer 'garbage' is not a valid multiaddr"),
        (dict(initial_peers=["/ip4/1.2.3/tcp/5/p2p/" + A_PEER_ID]), "is not a valid multiaddr"),
        (dict(initial_peers=["/ip4/127.0.0.1/tcp/31337"]), "lacks its /p2p/<peer id> part"),
        (dict(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/99999"]), "listen address"),
        (dict(initial_peers=[], announce_maddrs=["/ip4/203.0.113.7/tcp/0"]), "needs an explicit port"),
        (dict(initial_peers=[], client_mode=True), "cannot start a swarm on its own"),
    ],
)
@pytest.mark.timeout(10)
def test_bad_addresses_are_a_user_error_before_anything_starts(kwargs, message):
    start = time.monotonic()
    with pytest.raises(UserError, match=re.escape(message)):
        start_dht(**{"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], **kwargs})
    assert time.monotonic() - start < 1.0


@pytest.mark.timeout(30)
def test_unreachable_initial_peer_is_a_user_error_within_seconds():
    start = time.monotonic()
    with pytest.raises(UserError, match="none of the initial peers answered") as err:
        start_dht(
            initial_peers=[f"/ip4/127.0.0.1/tcp/9/p2p/{A_PEER_ID}"],  # the discard port: nobody listens
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            startup_timeout_s=5.0,
        )
    assert A_PEER_ID in str(err.value)  # says which peers it tried
    assert time.monotonic() - start < 10.0


@pytest.mark.timeout(60)
def test_an_identity_file_keeps_the_peer_id_across_restarts(start_peer, tmp_path):
    key = tmp_path / "coordinator.key"
    first = start_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=key)
    peer_id = first.peer_id
    first.shutdown()
    again = start_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=key)
    start_peer.on_shutdown(again.shutdown)
    assert again.peer_id == peer_id


@pytest.mark.timeout(60)
def test_listing_connected_peers_never_waits_on_a_dht_that_does_not_answer(start_peer):
    """The coordinator lists its peers in its status loop, which also keeps the run's definition
    alive in the DHT: a DHT process that does not answer (here: stopped) must cost a bounded wait."""
    import os
    import signal

    from dalle_together.swarm.dht import connected_peers

    first = start_peer("run")
    second = start_peer("run", initial_peers=visible_maddrs(first))
    assert any(a.endswith(str(second.peer_id)) for a in connected_peers(first))

    os.kill(first.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert connected_peers(first, timeout_s=1.0) == []
        assert time.monotonic() - started < 5.0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert any(a.endswith(str(second.peer_id)) for a in connected_peers(first))
