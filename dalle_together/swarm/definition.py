"""A run's definition: the configuration and tokenizer files every volunteer must share.

The coordinator publishes it in the DHT under ``{run_id}_definition`` (signed, expiring, refreshed
by calling :func:`publish_definition` again) and serves the files itself over libp2p: a stream
handler registered on its DHT's p2p daemon sends each file in chunks. A joiner reads the
definition, downloads the files from the coordinator's peer id, checks size and sha256 and only
then moves each into its cache (atomically), so a truncated or tampered file is never used.

Both the handler and the download run inside the DHT's own process (``dht.run_coroutine``), on
the event loop hivemind already keeps there; nothing here starts threads or loops of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hivemind
from google.protobuf.wrappers_pb2 import BytesValue, StringValue
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.logging import get_logger

from dalle_together.checkpoint import atomic_path
from dalle_together.config import RunConfig
from dalle_together.errors import UserError
from dalle_together.swarm.dht import local_public_key, peer_id_of
from dalle_together.swarm.records import (
    FILE_NAME_REGEX,
    DefinitionRecord,
    FileEntry,
    definition_key,
    read_entries,
)

logger = get_logger(__name__)

CHUNK_BYTES = 1 << 20
FUTURE_TOLERANCE_S = 60.0
"""A joiner refuses an entry dated further ahead of its clock than this: the newest entry wins, so
a peer that dated its own in the future would stay the run's publisher (and its schedule's)."""
DOWNLOAD_ATTEMPTS = 3
"""A file's download is tried this many times (1 s, then 2 s apart): a stream the network cuts ends,
for hivemind's client, like a complete one (it stops reading at the connection's end, without an
error), so a short file is as likely a dropped connection as a bad coordinator."""
PEER_LOCAL_OPTIONS = frozenset({"optim.batch_size", "swarm.offload_optimizer", "swarm.compression"})
"""Options a volunteer may set for itself; every other option must match the run's definition.

Compression is per sender: hivemind tags every tensor it sends with its codec, so a volunteer on a
slow link may send 8-bit while the others send fp16."""


@dataclass(frozen=True, kw_only=True)
class TokenizerFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class RunDefinition:
    run_id: str
    config: RunConfig
    fingerprint: str
    files: tuple[TokenizerFile, ...]
    server_peer_id: str
    """The coordinator's libp2p id: joiners download ``files`` from it."""
    protocol: str
    published_at: float
    publisher: bytes = b""
    """The subkey (signed public key) the definition was published under: the coordinator's key,
    the only one whose schedule updates (:mod:`.schedule`) a volunteer follows."""
    fitted_schedule: bool = False
    """Whether the coordinator publishes a schedule fitted to a time budget (else none ever comes)."""


def files_protocol(run_id: str) -> str:
    return f"dalle_together.files.v1::{run_id}"


# --- hashing ---------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    """:func:`sha256_file` cached by (path, size, mtime), so re-publishing every minute is cheap."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


# --- the coordinator side ----------------------------------------------------------------------

_SERVED_FILES: dict[str, dict[str, str]] = {}
"""run_id -> {file name: path}; lives in the DHT process, where the handler runs."""


async def _serve_files(_dht: hivemind.DHT, node: Any, *, run_id: str, files: dict[str, str]) -> None:
    """(In the DHT process) update the files served for ``run_id``; register the handler once."""
    first_time = run_id not in _SERVED_FILES
    _SERVED_FILES[run_id] = files
    if first_time:
        await node.p2p.add_protobuf_handler(
            files_protocol(run_id), partial(_send_file, run_id=run_id), StringValue, stream_output=True
        )


async def _send_file(request: StringValue, context: Any, *, run_id: str):
    """(In the DHT process) stream one served file in chunks; unknown names are refused."""
    path = _SERVED_FILES.get(run_id, {}).get(request.value)
    if path is None:
        raise KeyError(f"file {request.value!r} is not served for run {run_id!r}")
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while chunk := await loop.run_in_executor(None, f.read, CHUNK_BYTES):
            yield BytesValue(value=chunk)


def publish_definition(
    dht: hivemind.DHT,
    run_id: str,
    cfg: RunConfig,
    files: Mapping[str, str | os.PathLike[str]],
    *,
    expiration_s: float = 300.0,
    fitted_schedule: bool = False,
) -> RunDefinition:
    """Publish run ``run_id``'s definition for ``expiration_s`` s and serve ``files`` (name -> path).

    Call it again before the expiration (e.g. every ``expiration_s / 3``) to keep the run visible;
    re-publishing is cheap (file hashes are cached) and picks up changed files.
    :param fitted_schedule: this peer publishes the run's schedule (:mod:`.schedule`); volunteers
      follow one only if the definition says so.
    """
    entries, table = [], {}
    for name, path in sorted(files.items()):
        path = Path(path)
        if not re.match(FILE_NAME_REGEX, name):
            raise UserError(f"cannot serve {name!r}: a served file needs a plain file name")
        if not path.is_file():
            raise UserError(f"cannot serve {name}: {path} does not exist")
        entries.append(FileEntry(name=name, size=path.stat().st_size, sha256=_cached_sha256(path)))
        table[name] = str(path.resolve())
    dht.run_coroutine(partial(_serve_files, run_id=run_id, files=table))

    now = get_dht_time()
    record = DefinitionRecord(
        config=cfg.to_dict(),
        fingerprint=cfg.fingerprint(),
        files=entries,
        server_peer_id=str(dht.peer_id),
        protocol=files_protocol(run_id),
        time=float(now),
        fitted_schedule=fitted_schedule,
    )
    stored = dht.store(
        key=definition_key(run_id),
        subkey=local_public_key(dht),
        value=record.dict(),
        expiration_time=now + expiration_s,
    )
    if not stored:
        logger.warning(f"could not store the definition of run {run_id!r} in the DHT; will retry on refresh")
    return _to_definition(run_id, record, publisher=local_public_key(dht))


def _to_definition(run_id: str, record: DefinitionRecord, *, publisher: bytes) -> RunDefinition:
    try:
        cfg = RunConfig.from_dict(record.config)
    except UserError as e:
        raise UserError(f"run {run_id!r} has an invalid configuration: {e}") from None
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(
            f"run {run_id!r} uses a configuration this version of dalle-together does not understand "
            f"({type(e).__name__}: {e}); update dalle-together to the coordinator's version"
        ) from None
    if cfg.fingerprint() != record.fingerprint:
        raise UserError(
            f"run {run_id!r} was defined by a different version of dalle-together (its fingerprint "
            f"{record.fingerprint} != {cfg.fingerprint()} here); update to the coordinator's version"
        )
    return RunDefinition(
        run_id=run_id,
        config=cfg,
        fingerprint=record.fingerprint,
        files=tuple(TokenizerFile(name=f.name, size=f.size, sha256=f.sha256) for f in record.files),
        server_peer_id=record.server_peer_id,
        protocol=record.protocol,
        published_at=record.time,
        publisher=publisher,
        fitted_schedule=record.fitted_schedule,
    )


# --- the joiner side --------------------------------------------------------------------------


def fetch_definition(
    dht: hivemind.DHT, run_id: str, *, timeout_s: float = 15.0, trusted_peers: Collection[str] = ()
) -> RunDefinition:
    """Find run ``run_id``'s definition in the DHT, retrying for up to ``timeout_s`` seconds.

    Any peer may publish an entry: one served by a peer of ``trusted_peers`` (the full addresses
    this peer bootstrapped from, its ``--initial-peers``: usually the coordinator) wins; without
    one, the most recently published entry (e.g. a restarted coordinator's, whose old entry has not
    expired yet). An entry dated in the
    future is refused, or its author would stay the newest publisher. The server peer id is what
    an entry says of itself: this settles honest conflicts (a stale coordinator, a second run
    under the same id), not a peer that lies; authenticating the publisher is the security work's.
    :raises UserError: no peer serves the run, or its definition is not usable here.
    """
    trusted_ids = {peer_id_of(maddr) for maddr in trusted_peers}
    deadline = get_dht_time() + timeout_s
    while True:
        timeout = max(deadline - get_dht_time(), 0.5)
        entries = read_entries(dht, definition_key(run_id), DefinitionRecord, timeout_s=timeout)
        now, valid = get_dht_time(), {}
        for subkey, record in entries.items():
            if record.time > now + FUTURE_TOLERANCE_S:
                logger.debug(f"ignoring a definition of run {run_id!r} dated {record.time - now:.0f} s ahead")
            else:
                valid[subkey] = record
        if valid:
            publisher, record = _choose_entry(run_id, valid, trusted_ids)
            return _to_definition(run_id, record, publisher=publisher)
        if get_dht_time() >= deadline:
            raise UserError(
                f"no peer serves run {run_id!r} (waited {timeout_s:.0f} s); check the run id and that "
                f"its coordinator is running"
            )
        time.sleep(min(1.0, max(deadline - get_dht_time(), 0.0)))


def _choose_entry(
    run_id: str, entries: Mapping[bytes, DefinitionRecord], trusted_peer_ids: Collection[str]
) -> tuple[bytes, DefinitionRecord]:
    """(subkey, record) of the newest entry a trusted peer serves, else of the newest entry."""
    trusted = {s: r for s, r in entries.items() if r.server_peer_id in trusted_peer_ids}
    if not trusted and len({r.fingerprint for r in entries.values()}) > 1:
        logger.warning(f"peers publish different definitions of run {run_id!r}; using the newest")
    return max((trusted or entries).items(), key=lambda item: item[1].time)


def check_compatible(definition: RunDefinition, local_overrides: Mapping[str, Any]) -> RunConfig:
    """The configuration this volunteer trains with: the run's, plus the options it may set itself.

    :param local_overrides: options the volunteer gave, as ``{"section.field": value}`` (and
      ``"preset"``); ``None`` values (options not given) are ignored.
    :raises UserError: an option contradicts the run's definition.
    """
    cfg = definition.config
    sections: dict[str, dict[str, Any]] = {}
    for key, value in local_overrides.items():
        if value is None:
            continue
        if key == "preset":
            if value != cfg.preset:
                raise UserError(
                    f"run {definition.run_id!r} trains the {cfg.preset!r} preset, not {value!r}; "
                    f"leave --preset out to follow the run"
                )
            continue
        section, _, field = key.partition(".")
        current_section = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(current_section) or not hasattr(current_section, field):
            raise ValueError(f"unknown configuration option {key!r}")
        current = getattr(current_section, field)
        if key in PEER_LOCAL_OPTIONS:
            sections.setdefault(section, {})[field] = value
        elif _normalise(value) != _normalise(current):
            raise UserError(
                f"run {definition.run_id!r} is defined with {key} = {current!r}, but you asked for "
                f"{value!r}; leave the option out to follow the run"
            )
    if not sections:
        return cfg
    return cfg.replace(
        **{name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in sections.items()}
    )


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


async def _download_file(
    _dht: hivemind.DHT, node: Any, *, peer_id: str, protocol: str, name: str, dest: str, timeout_s: float
) -> int:
    """(In the DHT process) stream file ``name`` from ``peer_id`` into ``dest``; return its size."""
    stream = await asyncio.wait_for(
        node.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), protocol, StringValue(value=name), BytesValue
        ),
        timeout=timeout_s,
    )
    loop = asyncio.get_running_loop()
    size = 0
    with open(dest, "wb") as f:
        async for message in aiter_with_timeout(stream, timeout=timeout_s):
            await loop.run_in_executor(None, f.write, message.value)
            size += len(message.value)
    return size


def download_files(
    dht: hivemind.DHT,
    definition: RunDefinition,
    dest_dir: str | os.PathLike[str],
    *,
    timeout_s: float = 120.0,
) -> dict[str, Path]:
    """Make sure ``dest_dir`` holds the run's files with the published hashes; return name -> path.

    Files already there with the right hash are kept; others are downloaded from the coordinator,
    checked, and only then moved into place; a failed or mismatching download is tried again
    (:data:`DOWNLOAD_ATTEMPTS`). ``timeout_s`` bounds each attempt.
    :raises UserError: the coordinator cannot be reached, or a file does not match its hash.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for entry in definition.files:
        if not re.match(FILE_NAME_REGEX, entry.name):  # the schema checks too; never write outside dest_dir
            raise UserError(f"run {definition.run_id!r} lists an unsafe file name {entry.name!r}")
        dest = dest_dir / entry.name
        if dest.is_file() and dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
            out[entry.name] = dest
            continue
        with atomic_path(dest) as tmp:
            for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
                problem = _download_once(dht, definition, entry, tmp, timeout_s)
                if problem is None:
                    break
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise UserError(problem)
                logger.warning(f"{problem}; trying again ({attempt} of {DOWNLOAD_ATTEMPTS} attempts)")
                time.sleep(attempt)
        out[entry.name] = dest
        logger.info(f"downloaded {entry.name} ({entry.size} bytes) for run {definition.run_id!r}")
    return out


def _download_once(
    dht: hivemind.DHT, definition: RunDefinition, entry: FileEntry, tmp: Path, timeout_s: float
) -> str | None:
    """Download ``entry`` into ``tmp``; None if it arrived whole, else what went wrong."""
    future = dht.run_coroutine(
        partial(
            _download_file,
            peer_id=definition.server_peer_id,
            protocol=definition.protocol,
            name=entry.name,
            dest=str(tmp),
            timeout_s=timeout_s,
        ),
        return_future=True,
    )
    try:
        future.result(timeout=timeout_s + 5.0)
    except Exception as e:
        future.cancel()
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        return (
            f"could not download {entry.name} of run {definition.run_id!r} from its coordinator "
            f"({definition.server_peer_id}): {reason}"
        )
    size, digest = tmp.stat().st_size, sha256_file(tmp)
    if size != entry.size or digest != entry.sha256:
        return (
            f"{entry.name} from the coordinator does not match the run's definition (size {size} "
            f"vs {entry.size}, sha256 {digest[:12]}... vs {entry.sha256[:12]}...); refusing to use it"
        )
    return None
