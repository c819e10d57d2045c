"""The swarm layer: the only part of dalle-together that imports hivemind.

- :mod:`.dht`: start a peer's DHT node (addresses checked, failures as one sentence), its identity.
- :mod:`.records`: the run's DHT keys and the schemas every peer validates them against.
- :mod:`.definition`: the coordinator publishes the run's config and serves its tokenizer files;
  joiners fetch, verify and cache them.
- :mod:`.metrics`: each peer's metrics, and the run's status summarised from them.
- :mod:`.optimizer`: hivemind.Optimizer configured from a RunConfig.
- :mod:`.schedule`: a learning-rate schedule the coordinator fits to a time budget, and peers follow.
- :mod:`.checkpointer`: the coordinator's auxiliary peer that saves the swarm's state.
- :mod:`.coordinator`, :mod:`.volunteer`, :mod:`.status`: what ``dalle-together coordinator``,
  ``join`` and ``status`` run (the CLI only parses options and prints).
"""

from dalle_together.swarm.checkpointer import SwarmCheckpointer
from dalle_together.swarm.coordinator import CoordinatorOptions, run_coordinator
from dalle_together.swarm.definition import (
    RunDefinition,
    TokenizerFile,
    check_compatible,
    download_files,
    fetch_definition,
    publish_definition,
)
from dalle_together.swarm.dht import start_dht, visible_maddrs
from dalle_together.swarm.metrics import (
    PeerMetrics,
    RunStatus,
    publish_metrics,
    read_metrics,
    read_status,
    withdraw_metrics,
)
from dalle_together.swarm.optimizer import make_swarm_optimizer
from dalle_together.swarm.records import run_validators
from dalle_together.swarm.status import RunReport, query_status
from dalle_together.swarm.volunteer import VolunteerOptions, run_volunteer

__all__ = [
    "CoordinatorOptions",
    "PeerMetrics",
    "RunDefinition",
    "RunReport",
    "RunStatus",
    "SwarmCheckpointer",
    "TokenizerFile",
    "VolunteerOptions",
    "check_compatible",
    "download_files",
    "fetch_definition",
    "make_swarm_optimizer",
    "publish_definition",
    "publish_metrics",
    "query_status",
    "read_metrics",
    "read_status",
    "run_coordinator",
    "run_validators",
    "run_volunteer",
    "start_dht",
    "visible_maddrs",
    "withdraw_metrics",
]
