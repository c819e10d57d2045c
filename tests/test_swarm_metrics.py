"""Peers' metrics in the DHT: signed, validated, expiring, and summarised for ``status``."""

from __future__ import annotations

import time

import pytest
from hivemind.utils import get_dht_time

from dalle_together.swarm.dht import local_public_key, visible_maddrs
from dalle_together.swarm.metrics import publish_metrics, read_metrics, read_status, withdraw_metrics
from dalle_together.swarm.records import metrics_key

RUN = "metrics-test"


def _publish(dht, **overrides):
    kwargs = dict(
        samples_total=640,
        samples_per_second=12.5,
        loss=2.5,
        local_epoch=3,
        fingerprint="0123456789abcdef",
        device="cpu",
        name="alice",
    )
    return publish_metrics(dht, RUN, **{**kwargs, **overrides})


@pytest.mark.timeout(60)
def test_two_peers_publish_and_anyone_reads_the_summary(start_peer):
    coordinator = start_peer(RUN)
    alice = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    bob = start_peer(RUN, initial_peers=visible_maddrs(coordinator), client_mode=True)

    assert _publish(alice)
    assert _publish(
        bob, samples_total=100, samples_per_second=7.5, loss=float("nan"), local_epoch=4, name="bob"
    )

    peers = read_metrics(coordinator, RUN)
    assert sorted(p.name for p in peers) == ["alice", "bob"]
    by_name = {p.name: p for p in peers}
    assert by_name["alice"].peer_id == str(alice.peer_id) and by_name["alice"].loss == 2.5
    assert by_name["bob"].loss is None  # NaN is published as "no loss yet", which the schema accepts
    assert abs(by_name["bob"].time - get_dht_time()) < 30

    status = read_status(coordinator, RUN)
    assert status.alive_peers == 2
    assert status.global_epoch == 4
    assert status.samples_per_second == pytest.approx(20.0)
    assert status.samples_total == 740
    assert status.loss == pytest.approx(2.5)

    assert _publish(alice, samples_total=1280, local_epoch=5)  # a refresh replaces the peer's entry
    assert {p.name: p.samples_total for p in read_metrics(bob, RUN)} == {"alice": 1280, "bob": 100}

    assert withdraw_metrics(bob, RUN)  # a peer that leaves stops counting at once
    assert [p.name for p in read_metrics(coordinator, RUN)] == ["alice"]


@pytest.mark.timeout(60)
def test_entries_are_validated_signed_and_expire(start_peer):
    coordinator = start_peer(RUN)
    mallory = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    alice = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    assert _publish(alice)
    entry = read_metrics(coordinator, RUN)[0].dict()
    expiration = get_dht_time() + 60

    # a value that needs a type conversion, or is missing a field, is refused by the schema
    wrong_type = {**entry, "samples_total": 640.0}
    assert not mallory.store(metrics_key(RUN), wrong_type, expiration, subkey=local_public_key(mallory))
    # nobody can overwrite another peer's entry: it is signed with the owner's key
    assert not mallory.store(
        metrics_key(RUN), {**entry, "loss": 0.0}, expiration, subkey=local_public_key(alice)
    )
    assert [p.loss for p in read_metrics(coordinator, RUN)] == [2.5]

    # an entry that is not refreshed disappears
    assert _publish(mallory, name="mallory", expiration_s=1.0)
    assert len(read_metrics(coordinator, RUN)) == 2
    time.sleep(1.5)
    assert [p.name for p in read_metrics(coordinator, RUN)] == ["alice"]
