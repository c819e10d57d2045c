"""Each peer's training metrics in the DHT, and the run's status summarised from them.

This is the one place metrics are published and read: ``join`` publishes, ``status`` (and a future
web dashboard) reads. A peer's entry is signed with its own key and expires unless refreshed, so
the alive peers are exactly the entries that have not expired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import hivemind
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time

from dalle_together.swarm.dht import local_public_key
from dalle_together.swarm.records import PeerMetrics, metrics_key, progress_key, read_entries

__all__ = ["PeerMetrics", "RunStatus", "publish_metrics", "read_metrics", "read_status"]


def publish_metrics(
    dht: hivemind.DHT,
    run_id: str,
    *,
    samples_total: int,
    samples_per_second: float,
    loss: float | None,
    local_epoch: int,
    fingerprint: str,
    device: str = "",
    name: str = "",
    expiration_s: float = 60.0,
) -> bool:
    """Publish (or refresh) this peer's metrics for ``expiration_s`` seconds; True if stored.

    Refresh well within ``expiration_s`` (e.g. every ``expiration_s / 3``), or the peer counts as gone.
    """
    now = get_dht_time()
    record = PeerMetrics(
        peer_id=str(dht.peer_id),
        name=name[:64],
        device=device[:64],
        fingerprint=fingerprint,
        samples_total=int(samples_total),
        samples_per_second=max(float(samples_per_second), 0.0) if math.isfinite(samples_per_second) else 0.0,
        loss=float(loss) if loss is not None and math.isfinite(loss) else None,  # NaN fails validation
        local_epoch=int(local_epoch),
        time=float(now),
    )
    return bool(
        dht.store(
            key=metrics_key(run_id),
            subkey=local_public_key(dht),
            value=record.dict(),
            expiration_time=now + expiration_s,
        )
    )


def withdraw_metrics(dht: hivemind.DHT, run_id: str, *, expiration_s: float = 60.0) -> bool:
    """Say goodbye: replace this peer's entry with an empty one so it stops counting as alive."""
    return bool(
        dht.store(
            key=metrics_key(run_id),
            subkey=local_public_key(dht),
            value=None,
            expiration_time=get_dht_time() + expiration_s,
        )
    )


def read_metrics(dht: hivemind.DHT, run_id: str) -> list[PeerMetrics]:
    """The metrics of every alive peer (entry not expired), ordered by peer id."""
    peers = read_entries(dht, metrics_key(run_id), PeerMetrics).values()
    return sorted(peers, key=lambda m: m.peer_id)


def _read_progress(dht: hivemind.DHT, run_id: str) -> list[LocalTrainingProgress]:
    return list(read_entries(dht, progress_key(run_id), LocalTrainingProgress).values())


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    """What ``dalle-together status`` shows: the collaboration at a glance."""

    run_id: str
    global_epoch: int
    """The collaboration's optimizer step: the newest epoch any training peer reports."""
    alive_peers: int
    """Peers with an unexpired metrics entry."""
    training_peers: int
    """Peers hivemind's progress tracker currently counts towards the global batch."""
    samples_per_second: float
    """Sum over alive peers."""
    samples_accumulated: int
    """Samples gathered so far towards the next epoch (hivemind's progress tracker)."""
    samples_total: int
    """Samples contributed by the alive peers since they joined."""
    loss: float | None
    """Mean loss over alive peers that reported one."""
    peers: tuple[PeerMetrics, ...]


def read_status(dht: hivemind.DHT, run_id: str) -> RunStatus:
    """Summarise the run from the peers' metrics and hivemind's progress entries."""
    peers = read_metrics(dht, run_id)
    progress = _read_progress(dht, run_id)
    # hivemind's rule: the global epoch is the newest epoch of a peer that accepts connections
    servers = [p for p in progress if not p.client_mode] or progress
    global_epoch = max([p.epoch for p in servers] + [m.local_epoch for m in peers], default=0)
    accumulated = sum(p.samples_accumulated for p in progress if p.epoch == global_epoch)
    losses = [m.loss for m in peers if m.loss is not None]
    return RunStatus(
        run_id=run_id,
        global_epoch=global_epoch,
        alive_peers=len(peers),
        training_peers=len(progress),
        samples_per_second=sum(m.samples_per_second for m in peers),
        samples_accumulated=accumulated,
        samples_total=sum(m.samples_total for m in peers),
        loss=sum(losses) / len(losses) if losses else None,
        peers=tuple(peers),
    )
