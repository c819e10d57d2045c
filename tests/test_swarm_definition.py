"""A run's definition: published by the coordinator, fetched and verified by joiners."""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import BytesValue, StringValue
from hivemind.utils import get_dht_time

from dalle_together.config import RunConfig, preset
from dalle_together.errors import UserError
from dalle_together.swarm.definition import (
    check_compatible,
    download_files,
    fetch_definition,
    files_protocol,
    publish_definition,
)
from dalle_together.swarm.dht import local_public_key, visible_maddrs
from dalle_together.swarm.records import DefinitionRecord, definition_key, read_entries

RUN = "defn-test"
FILES = ("vqvae.safetensors", "vqvae.json", "text_tokenizer.json")


@pytest.fixture
def tokenizer_files(tmp_path: Path) -> dict[str, Path]:
    served = tmp_path / "served"
    served.mkdir()
    (served / "vqvae.safetensors").write_bytes(os.urandom(2_500_000))  # several chunks
    (served / "vqvae.json").write_text('{"codebook_size": 512}')
    (served / "text_tokenizer.json").write_text("")  # an empty file is a file too
    return {name: served / name for name in FILES}


@pytest.mark.timeout(60)
def test_joiner_fetches_the_definition_and_verified_files(start_peer, tokenizer_files, tmp_path):
    coordinator = start_peer(RUN)
    joiner = start_peer(RUN, initial_peers=visible_maddrs(coordinator), client_mode=True)
    cfg = preset("tiny")
    published = publish_definition(coordinator, RUN, cfg, tokenizer_files, expiration_s=60)

    definition = fetch_definition(joiner, RUN, timeout_s=10)
    assert definition == published
    assert definition.config == cfg and definition.fingerprint == cfg.fingerprint()
    assert definition.server_peer_id == str(coordinator.peer_id)
    assert definition.publisher == local_public_key(coordinator)  # whose schedule joiners follow
    assert {f.name: f.size for f in definition.files} == {
        n: p.stat().st_size for n, p in tokenizer_files.items()
    }

    cache = tmp_path / "cache"
    paths = download_files(joiner, definition, cache)
    assert set(paths) == set(FILES)
    for name, path in paths.items():
        assert path == cache / name and path.read_bytes() == tokenizer_files[name].read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES)  # no temporary files left

    mtimes = {name: path.stat().st_mtime_ns for name, path in paths.items()}
    download_files(joiner, definition, cache)  # already there with the right hashes: kept as is
    assert {name: path.stat().st_mtime_ns for name, path in paths.items()} == mtimes

    # a served file that no longer matches the published hash is refused and never lands in the cache
    tokenizer_files["vqvae.json"].write_text('{"codebook_size": 666}')
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="vqvae.json from the coordinator does not match"):
        download_files(joiner, definition, fresh)
    assert not (fresh / "vqvae.json").exists()
    assert not any(p.name.startswith(".vqvae.json") for p in fresh.iterdir())

    # re-publishing picks up the change, and the download then succeeds
    republished = publish_definition(coordinator, RUN, cfg, tokenizer_files, expiration_s=60)
    assert republished.files != definition.files
    assert (
        download_files(joiner, fetch_definition(joiner, RUN), fresh)["vqvae.json"]
        .read_text()
        .endswith("666}")
    )


def another_cfg() -> RunConfig:
    cfg = preset("tiny")
    return cfg.replace(optim=dataclasses.replace(cfg.optim, lr=1.0))


def store_definition(dht, cfg: RunConfig, *, time_s: float) -> None:
    """Store a definition as any peer can: signed by itself, dated as it likes."""
    record = DefinitionRecord(
        config=cfg.to_dict(),
        fingerprint=cfg.fingerprint(),
        files=[],
        server_peer_id=str(dht.peer_id),
        protocol=files_protocol(RUN),
        time=time_s,
    )
    assert dht.store(definition_key(RUN), record.dict(), get_dht_time() + 60, subkey=local_public_key(dht))


@pytest.mark.timeout(60)
def test_a_definition_dated_in_the_future_is_refused(start_peer, tokenizer_files):
    coordinator = start_peer(RUN)
    impostor = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    joiner = start_peer(RUN, initial_peers=visible_maddrs(coordinator), client_mode=True)
    published = publish_definition(coordinator, RUN, preset("tiny"), tokenizer_files, expiration_s=60)
    # dated an hour ahead, it would stay the newest entry, and its author the run's publisher
    store_definition(impostor, another_cfg(), time_s=get_dht_time() + 3600)
    assert len(read_entries(joiner, definition_key(RUN), DefinitionRecord)) == 2
    assert fetch_definition(joiner, RUN, timeout_s=10) == published

    # a clock a little ahead is no attack: that entry is the newest
    store_definition(impostor, another_cfg(), time_s=get_dht_time() + 30)
    assert fetch_definition(joiner, RUN, timeout_s=10).config == another_cfg()


@pytest.mark.timeout(60)
def test_the_bootstrap_peer_s_definition_wins_over_a_newer_one(start_peer, tokenizer_files):
    coordinator = start_peer(RUN)
    other = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    published = publish_definition(coordinator, RUN, preset("tiny"), tokenizer_files, expiration_s=60)
    newer = publish_definition(other, RUN, another_cfg(), tokenizer_files, expiration_s=60)
    assert newer.published_at > published.published_at

    addresses = visible_maddrs(coordinator)  # what a volunteer is given
    joiner = start_peer(RUN, initial_peers=addresses, client_mode=True)
    assert fetch_definition(joiner, RUN, timeout_s=10, trusted_peers=addresses) == published
    assert fetch_definition(joiner, RUN, timeout_s=10) == newer  # no trusted peer: the newest


_STREAMS_SERVED: dict[str, int] = {}  # file name -> streams opened for it, in the serving DHT's process


async def _cut_the_first_stream(request: StringValue, _context, *, served: dict[str, str]):
    """Serve a file, except that each file's first stream ends before its first chunk: what the
    client sees when the network drops the connection (hivemind's client ends the stream quietly)."""
    _STREAMS_SERVED[request.value] = _STREAMS_SERVED.get(request.value, 0) + 1
    if _STREAMS_SERVED[request.value] > 1:
        yield BytesValue(value=Path(served[request.value]).read_bytes())


async def _serve_flakily(_dht, node, *, protocol: str, served: dict[str, str]) -> None:
    handler = partial(_cut_the_first_stream, served=served)
    await node.p2p.add_protobuf_handler(protocol, handler, StringValue, stream_output=True)


async def _streams_served(_dht, _node) -> dict[str, int]:
    return dict(_STREAMS_SERVED)


@pytest.mark.timeout(60)
def test_a_download_cut_short_is_tried_again(start_peer, tokenizer_files, tmp_path):
    coordinator = start_peer(RUN)
    joiner = start_peer(RUN, initial_peers=visible_maddrs(coordinator), client_mode=True)
    definition = publish_definition(coordinator, RUN, preset("tiny"), tokenizer_files, expiration_s=60)
    flaky = dataclasses.replace(definition, protocol=definition.protocol + ".flaky")
    served = {name: str(path) for name, path in tokenizer_files.items()}
    coordinator.run_coroutine(partial(_serve_flakily, protocol=flaky.protocol, served=served))

    paths = download_files(joiner, flaky, tmp_path / "cache")
    for name, path in paths.items():
        assert path.read_bytes() == tokenizer_files[name].read_bytes()
    # the files with content came on the second try; the empty one's first, empty stream was right
    assert coordinator.run_coroutine(_streams_served) == {
        "vqvae.safetensors": 2,
        "vqvae.json": 2,
        "text_tokenizer.json": 1,
    }


@pytest.mark.timeout(60)
def test_unknown_run_and_vanished_coordinator_are_user_errors(start_peer, tokenizer_files, tmp_path):
    coordinator = start_peer(RUN)
    joiner = start_peer(RUN, initial_peers=visible_maddrs(coordinator))
    start = time.monotonic()
    with pytest.raises(UserError, match="no peer serves run 'no-such-run'"):
        fetch_definition(joiner, "no-such-run", timeout_s=2)
    assert time.monotonic() - start < 6

    publish_definition(coordinator, RUN, preset("tiny"), tokenizer_files, expiration_s=60)
    definition = fetch_definition(joiner, RUN)
    coordinator.shutdown()
    with pytest.raises(UserError, match="could not download .* from its coordinator"):
        download_files(joiner, definition, tmp_path / "cache", timeout_s=5)


def test_local_options_must_agree_with_the_definition(start_peer, tokenizer_files):
    coordinator = start_peer(RUN)
    definition = publish_definition(coordinator, RUN, preset("tiny"), tokenizer_files)

    cfg = check_compatible(
        definition, {"preset": "tiny", "model.dim": 128, "optim.batch_size": 8, "data.seed": None}
    )
    assert cfg.optim.batch_size == 8  # a volunteer's own batch size is its business
    assert cfg == definition.config.replace(optim=dataclasses.replace(definition.config.optim, batch_size=8))

    with pytest.raises(UserError, match=r"defined with model.dim = 128, but you asked for 256"):
        check_compatible(definition, {"model.dim": 256})
    with pytest.raises(UserError, match="trains the 'tiny' preset, not 'small'"):
        check_compatible(definition, {"preset": "small"})
    with pytest.raises(UserError, match="optim.target_batch_size"):
        check_compatible(definition, {"optim.target_batch_size": 4096})
