"""What a run keeps in the DHT: its keys, and the schemas every peer validates records against.

Three records belong to a run ``R`` (hivemind's own ``R_progress``, ``R_state_averager...`` and
``R_grad_averager...`` keys sit beside them):

- ``R_definition``: the run's configuration and tokenizer files, one entry per publisher;
- ``R_metrics``: one entry per peer (loss, throughput, samples contributed);
- ``R_schedule``: the learning-rate schedule once the coordinator has fitted it to a time budget
  (volunteers follow only the entry signed by the key that signed the definition they use).

Each entry lives under a subkey holding its author's RSA public key and is signed with the
matching private key, so only its author can change it (hivemind's ``RSASignatureValidator``);
``SchemaValidator`` makes every peer refuse to store an entry that does not match the schema.
Both validators only protect the DHT if every peer installs them: start each peer's DHT with
``start_dht(..., record_validators=run_validators(run_id))``.

hivemind 1.1.12 validates with pydantic's v1 API, so the schemas here are ``pydantic.v1`` models
with strict field types (a record that needs any type conversion is rejected).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.logging import get_logger

from dalle_together.errors import UserError

logger = get_logger(__name__)
Record = TypeVar("Record", bound=pydantic.BaseModel)

FILE_NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A served file's name: a plain file name, never a path (joiners write it into their cache)."""


def definition_key(run_id: str) -> str:
    return f"{run_id}_definition"


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


def schedule_key(run_id: str) -> str:
    return f"{run_id}_schedule"


def progress_key(run_id: str) -> str:
    """hivemind.Optimizer's progress tracker publishes each peer's epoch and samples here."""
    return f"{run_id}_progress"


class PeerMetrics(pydantic.BaseModel):
    """One peer's report, refreshed while it trains; it disappears when the peer stops refreshing it."""

    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    """The peer's libp2p id (base58)."""
    name: pydantic.constr(strict=True, max_length=64)
    """A display name the volunteer chose (may be empty)."""
    device: pydantic.constr(strict=True, max_length=64)
    """What it trains on, e.g. ``cuda:NVIDIA A100`` or ``cpu``."""
    fingerprint: pydantic.constr(strict=True, max_length=32)
    """``RunConfig.fingerprint()`` of the configuration it trains with."""
    samples_total: pydantic.conint(ge=0, strict=True)
    """Samples this peer has contributed since it joined."""
    samples_per_second: pydantic.confloat(ge=0.0, strict=True)
    loss: pydantic.StrictFloat | None
    """Mean training loss over its recent local steps; ``None`` before the first one."""
    local_epoch: pydantic.conint(ge=0, strict=True)
    """The collaboration epoch (global optimizer step) this peer is at."""
    time: pydantic.StrictFloat
    """When it was published (hivemind's DHT time, seconds since the epoch)."""


class FileEntry(pydantic.BaseModel):
    name: pydantic.constr(strict=True, regex=FILE_NAME_REGEX)
    size: pydantic.conint(ge=0, strict=True)
    sha256: pydantic.constr(strict=True, regex=r"^[0-9a-f]{64}$")


class DefinitionRecord(pydantic.BaseModel):
    """A run's definition as published by its coordinator."""

    config: dict[pydantic.StrictStr, Any]
    """``RunConfig.to_dict()``."""
    fingerprint: pydantic.constr(strict=True, regex=r"^[0-9a-f]{1,64}$")
    files: list[FileEntry]
    server_peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    """The peer that serves ``files`` over libp2p (the publisher)."""
    protocol: pydantic.constr(strict=True, min_length=1, max_length=256)
    """The libp2p protocol (stream handler name) it serves them under."""
    time: pydantic.StrictFloat
    fitted_schedule: pydantic.StrictBool = False
    """Whether the coordinator fits the schedule to a time budget and publishes it under
    ``R_schedule``: only then do volunteers poll for it. Records of older versions lack it."""


MAX_SCHEDULE_SEGMENTS = 64


class ScheduleSegment(pydantic.BaseModel):
    """From ``from_epoch`` on, the cosine goes on from ``start_progress`` and ends at ``total_steps``."""

    from_epoch: pydantic.conint(ge=0, strict=True)
    total_steps: pydantic.conint(ge=1, strict=True)
    start_progress: pydantic.confloat(ge=0.0, le=1.0, strict=True)


class ScheduleRecord(pydantic.BaseModel):
    """The learning-rate schedule the coordinator fitted to the run's time budget (see ``.schedule``)."""

    segments: pydantic.conlist(ScheduleSegment, min_items=1, max_items=MAX_SCHEDULE_SEGMENTS)
    time: pydantic.StrictFloat

    @pydantic.validator("segments")
    def _in_order(cls, segments: list[ScheduleSegment]) -> list[ScheduleSegment]:
        if any(a.from_epoch >= b.from_epoch for a, b in zip(segments, segments[1:], strict=False)):
            raise ValueError("segments must start at increasing epochs")
        return segments


class _RunSchema(pydantic.BaseModel):
    metrics: dict[BytesWithPublicKey, PeerMetrics | None]
    definition: dict[BytesWithPublicKey, DefinitionRecord | None]
    schedule: dict[BytesWithPublicKey, ScheduleRecord | None]


def read_entries(
    dht: hivemind.DHT, key: str, schema: type[Record], *, timeout_s: float | None = None
) -> dict[bytes, Record]:
    """The entries under ``key`` that match ``schema``, by subkey (the public key of their author).

    An entry whose value is ``None`` is a peer that said goodbye; a malformed one was stored by a
    peer without the run's validators or of another version, and must not hide the others'.
    With ``timeout_s``, a DHT that has not answered by then reads as no entries yet.
    """
    future = dht.get(key, latest=True, return_future=True)
    try:
        found = future.result(timeout=timeout_s)
    except TimeoutError:
        future.cancel()
        return {}
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, entry in found.value.items():
        if entry.value is None:
            continue
        try:
            records[subkey] = schema.parse_obj(entry.value)
        except Exception as e:
            logger.debug(f"ignoring a malformed entry of {key}: {e}")
    return records


def run_validators(run_id: str) -> list[RecordValidatorBase]:
    """Validators for run ``run_id``'s records; every peer's DHT should be started with them."""
    return [SchemaValidator(_RunSchema, allow_extra_keys=True, prefix=run_id)]


RUN_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is usable as a DHT key prefix and a directory name, else a :class:`UserError`."""
    if not re.match(RUN_ID_REGEX, run_id):
        raise UserError(
            f"run id {run_id!r} is not valid: use up to 64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return run_id
