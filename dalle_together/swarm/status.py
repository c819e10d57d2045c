"""``dalle-together status``: look at a run from outside, as a short-lived client-mode peer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dalle_together.swarm.definition import RunDefinition, fetch_definition
from dalle_together.swarm.dht import start_dht
from dalle_together.swarm.metrics import RunStatus, read_status
from dalle_together.swarm.records import run_validators


@dataclass(frozen=True, kw_only=True)
class RunReport:
    definition: RunDefinition
    status: RunStatus

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (``NaN`` and missing values become ``None``)."""
        s, cfg = self.status, self.definition.config
        return {
            "run_id": s.run_id,
            "preset": cfg.preset,
            "fingerprint": self.definition.fingerprint,
            "target_batch_size": cfg.optim.target_batch_size,
            "epoch": s.global_epoch,
            "samples_per_second": round(s.samples_per_second, 2),
            "samples_accumulated": s.samples_accumulated,
            "alive_peers": s.alive_peers,
            "training_peers": s.training_peers,
            "samples_total": s.samples_total,
            "loss": _finite(s.loss),
            "peers": [
                {
                    "peer_id": p.peer_id,
                    "name": p.name,
                    "device": p.device,
                    "epoch": p.local_epoch,
                    "samples_total": p.samples_total,
                    "samples_per_second": round(p.samples_per_second, 2),
                    "loss": _finite(p.loss),
                }
                for p in s.peers
            ],
        }


def _finite(x: float | None) -> float | None:
    return round(x, 4) if x is not None and math.isfinite(x) else None


def query_status(*, initial_peers: Sequence[str], run_id: str, timeout_s: float = 10.0) -> RunReport:
    """Join the swarm as a client for a moment and read run ``run_id``'s definition and status.

    :raises UserError: bad or unreachable initial peers, or no peer serves the run.
    """
    dht = start_dht(initial_peers=initial_peers, client_mode=True, record_validators=run_validators(run_id))
    try:
        definition = fetch_definition(dht, run_id, timeout_s=timeout_s, trusted_peers=initial_peers)
        return RunReport(definition=definition, status=read_status(dht, run_id))
    finally:
        dht.shutdown()
