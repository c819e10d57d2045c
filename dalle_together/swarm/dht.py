"""Starting a peer's DHT node, with every failure a volunteer can cause turned into one sentence.

Each DHT started here gets its own RSA record key, which signs the records the peer owns (its
metrics, its run definition, hivemind's progress entry). Other modules ask :func:`signing_key`
for it, so several peers can share one process (tests) without overwriting each other's entries.
``authorizer=`` is the seam for an access-controlled run (hivemind's ``AuthorizerBase``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import Multiaddr

from dalle_together.checkpoint import atomic_path
from dalle_together.errors import UserError

logger = get_logger(__name__)
T = TypeVar("T")

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)
"""Listen on every IPv4 interface, on a port the OS picks."""

_SIGNING_KEYS: weakref.WeakKeyDictionary[hivemind.DHT, RSAPrivateKey] = weakref.WeakKeyDictionary()


def _parse(maddr: str, what: str) -> Multiaddr:
    if not isinstance(maddr, str) or not maddr.strip():
        raise UserError(f"{what} {maddr!r} is not a multiaddr (expected e.g. /ip4/203.0.113.7/tcp/31337)")
    try:
        return Multiaddr(maddr.strip())
    except Exception as e:  # the multiaddr codecs raise several types (StringParseError, ValueError, ...)
        raise UserError(f"{what} {maddr!r} is not a valid multiaddr: {e}") from None


def check_initial_peer(maddr: str) -> str:
    """``maddr`` stripped, or a :class:`UserError` naming what is wrong with it."""
    parsed = _parse(maddr, "initial peer")
    if "p2p" not in parsed:
        raise UserError(
            f"initial peer {maddr!r} lacks its /p2p/<peer id> part; copy the whole address the "
            f"coordinator prints (like /ip4/203.0.113.7/tcp/31337/p2p/12D3KooW...)"
        )
    return str(parsed)


def peer_id_of(maddr: str) -> str:
    """The peer id (base58) in a full address's ``/p2p/<id>`` part."""
    return Multiaddr(check_initial_peer(maddr))["p2p"]


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    authorizer: object | None = None,
    record_validators: Iterable[RecordValidatorBase] = (),
    record_key: RSAPrivateKey | None = None,
    identity_path: str | os.PathLike[str] | None = None,
    startup_timeout_s: float = 10.0,
) -> hivemind.DHT:
    """Start this peer's DHT node and connect it to ``initial_peers`` (none: start a new swarm).

    :param initial_peers: full multiaddrs (with ``/p2p/<id>``) of peers already in the swarm.
    :param host_maddrs: where to listen, e.g. ``/ip4/0.0.0.0/tcp/31337``.
    :param announce_maddrs: public addresses to tell others (behind NAT/port forwarding), with ports.
    :param client_mode: a peer behind a firewall: it connects out but accepts no connections.
    :param authorizer: a ``hivemind.utils.auth.AuthorizerBase`` for access-controlled runs.
    :param record_validators: typically ``run_validators(run_id)``; a signature validator is added.
    :param record_key: the RSA key that signs this peer's DHT records (default: a fresh one).
    :param identity_path: a file holding this peer's libp2p key (created if missing), so that its
      peer id, and the addresses volunteers were given, survive a restart (use it for a coordinator).
    :param startup_timeout_s: give up if the initial peers have not answered by then.
    :raises UserError: a malformed address, no answer from any initial peer, or a port in use.
    """
    initial = [check_initial_peer(m) for m in initial_peers]
    hosts = [str(_parse(m, "listen address")) for m in host_maddrs]
    announce = []
    for m in announce_maddrs:
        parsed = _parse(m, "announce address")
        if ("tcp" in parsed and parsed["tcp"] == "0") or ("udp" in parsed and parsed["udp"] == "0"):
            raise UserError(
                f"announce address {m!r} needs an explicit port (port 0 means 'any' only when listening)"
            )
        announce.append(str(parsed))
    if client_mode and not initial:
        raise UserError("a client-mode peer cannot start a swarm on its own: give it --initial-peers")
    if not hosts and not client_mode:
        raise UserError("a peer that accepts connections needs at least one listen address")

    record_key = record_key if record_key is not None else RSAPrivateKey()
    validators = [RSASignatureValidator(record_key), *record_validators]
    dht = hivemind.DHT(
        initial_peers=initial,
        start=False,
        client_mode=client_mode,
        host_maddrs=hosts,
        announce_maddrs=announce or None,
        record_validators=validators,
        authorizer=authorizer,
        startup_timeout=startup_timeout_s,
        **({"identity_path": str(identity_path)} if identity_path is not None else {}),
    )
    try:
        # the p2p daemon bootstraps within startup_timeout_s, then the DHT pings initial peers (3 s)
        dht.run_in_background(await_ready=True, timeout=startup_timeout_s + 10.0)
    except BaseException as e:
        _stop(dht)
        raise _explain(e, initial, hosts, startup_timeout_s) from None
    _SIGNING_KEYS[dht] = record_key
    logger.debug(f"DHT started: peer {dht.peer_id}, client_mode={client_mode}")
    return dht


def _stop(dht: hivemind.DHT) -> None:
    if dht.is_alive():
        dht.shutdown()
    dht.join(timeout=5)
    if dht.is_alive():
        dht.terminate()
        dht.join(timeout=5)


def _explain(e: BaseException, initial: list[str], hosts: list[str], timeout_s: float) -> BaseException:
    if isinstance(e, KeyboardInterrupt):
        return e
    text = str(e)
    bootstrap_failed = (
        "failed to connect to bootstrap peers" in text
        or "bootstrap failed" in text
        or (initial and ("failed to start in" in text or isinstance(e, TimeoutError)))
    )
    if initial and bootstrap_failed:
        peers = ", ".join(initial)
        return UserError(
            f"none of the initial peers answered ({peers}); check the addresses and that the "
            f"coordinator is running and reachable (waited up to {timeout_s:.0f} s)"
        )
    if "address already in use" in text:
        return UserError(f"cannot listen on {', '.join(hosts)}: address already in use (pick another port)")
    if isinstance(e, (P2PDaemonError, RuntimeError, TimeoutError, OSError)):
        return UserError(f"could not start the p2p node: {text.strip() or type(e).__name__}")
    return e


def load_record_key(path: str | os.PathLike[str]) -> RSAPrivateKey:
    """The RSA key in ``path`` (created, readable by its owner only, if missing): a peer that signs
    with the same key across restarts keeps ownership of its records (the coordinator's definition
    and schedule, which volunteers follow by key)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if path.is_file():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        try:
            key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
        except ValueError:
            raise UserError(f"{path} is not a private key; delete it to make a new one") from None
        return key
    key = RSAPrivateKey()
    with atomic_path(path, mode=0o600) as tmp:
        tmp.write_bytes(key.to_bytes())
    return key


def signing_key(dht: hivemind.DHT) -> RSAPrivateKey:
    """The key that signs ``dht``'s records (hivemind's process-wide key for a DHT not started here)."""
    key = _SIGNING_KEYS.get(dht)
    return key if key is not None else RSAPrivateKey.process_wide()


def local_public_key(dht: hivemind.DHT) -> bytes:
    """The subkey under which ``dht`` publishes records that only it may change."""
    return RSASignatureValidator(signing_key(dht)).local_public_key


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Addresses others can pass as initial peers (``/ip4/.../tcp/.../p2p/<id>``), public ones first."""
    peer_id = str(dht.peer_id)
    out: list[tuple[int, str]] = []
    for maddr in dht.get_visible_maddrs():
        if not any(proto in maddr for proto in ("ip4", "ip6", "dns4", "dns6", "dns")):
            continue  # relay-only or unix addresses are of no use to a volunteer
        text = str(maddr)
        if "p2p" not in maddr:
            text = f"{text}/p2p/{peer_id}"
        rank = 1
        for proto in ("ip4", "ip6"):
            if proto in maddr:
                ip = ipaddress.ip_address(maddr[proto])
                rank = 2 if ip.is_loopback else (1 if ip.is_private or ip.is_link_local else 0)
        out.append((rank, text))
    return [text for _, text in sorted(set(out))]


def connected_peers(dht: hivemind.DHT, *, timeout_s: float = 10.0) -> list[str]:
    """Full multiaddrs (``.../p2p/<id>``) of the peers ``dht``'s p2p daemon is connected to now;
    none if the daemon does not answer within ``timeout_s`` (the list is only a hint).

    libp2p dials from its listen port (port reuse), so an inbound connection's remote address is
    where that peer can be reached again: what :func:`reconnect` needs after a restart."""
    return _run_bounded(dht, _connected_peers, timeout_s=timeout_s, default=[])


def _run_bounded(
    dht: hivemind.DHT, coro: Callable[[hivemind.DHT, DHTNode], Awaitable[T]], *, timeout_s: float, default: T
) -> T:
    """``dht.run_coroutine(coro)``, or ``default`` if it fails or takes longer than ``timeout_s``.

    In one `make demo` the coordinator's status loop stopped for good when hivemind logged "Caught
    an exception when running a coroutine" for its :func:`connected_peers` call, so the run's
    definition was no longer refreshed and the run vanished from the DHT. hivemind 1.1.12 sends a
    coroutine's exception back through a pipe; one that cannot be pickled never arrives and leaves
    the caller waiting for ever (checked with a throw-away script). The coroutines given here keep
    their own failures in the DHT process too."""
    future = None
    try:
        future = dht.run_coroutine(coro, return_future=True)
        return future.result(timeout=timeout_s)
    except (Exception, asyncio.CancelledError) as e:
        if future is not None:
            future.cancel()
        logger.debug(f"{coro} failed or did not answer in {timeout_s} s: {e!r}")
        return default


async def _connected_peers(_dht: hivemind.DHT, node: DHTNode) -> list[str]:
    try:
        peers = await node.p2p.list_peers()
    except Exception as e:
        logger.debug(f"could not list the p2p daemon's peers: {e!r}")
        return []
    return sorted(f"{addr}/p2p/{info.peer_id}" for info in peers for addr in info.addrs)


def reconnect(dht: hivemind.DHT, maddrs: Sequence[str], *, timeout_s: float = 10.0) -> tuple[int, int]:
    """Connect ``dht`` to peers it knew before a restart: (how many answered within ``timeout_s``,
    how many peers ``maddrs`` name).

    A restarted first peer (the coordinator) has no initial peers, and the swarm's peers dropped it
    from their routing tables when it stopped answering: without this nobody would find it again,
    and it could not reach the peers whose state it saves. Each peer that answers a DHT ping is in
    this node's routing table afterwards, and this node in theirs."""
    by_peer: dict[str, list[str]] = {}
    for maddr in maddrs:
        address = Multiaddr(maddr)
        peer = address["p2p"]
        by_peer.setdefault(peer, []).append(str(address.decapsulate(Multiaddr(f"/p2p/{peer}"))))
    coro = functools.partial(_reconnect, by_peer, timeout_s)
    return _run_bounded(dht, coro, timeout_s=timeout_s + 5.0, default=0), len(by_peer)


async def _reconnect(
    by_peer: dict[str, list[str]], timeout_s: float, _dht: hivemind.DHT, node: DHTNode
) -> int:
    async def one(peer: PeerID, addrs: list[str]) -> bool:
        # hivemind's P2P has no public dial: this is the call it makes for its own initial peers
        await node.p2p._client.connect(peer, [Multiaddr(a) for a in addrs])
        return await node.protocol.call_ping(peer) is not None

    async def bounded(peer: str, addrs: list[str]) -> bool:
        with contextlib.suppress(Exception):  # gone, moved, or never reachable (client mode)
            return await asyncio.wait_for(one(PeerID.from_base58(peer), addrs), timeout_s)
        return False

    return sum(await asyncio.gather(*(bounded(peer, addrs) for peer, addrs in by_peer.items())))


def configure_hivemind_logging(*, verbose: bool) -> None:
    """Send hivemind's log records through the application's handlers: warnings, or all if ``verbose``.

    hivemind installs its own stderr handler at import; a volunteer should see one format.
    """
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_without_hivemind_tracebacks)
        # hivemind steps the schedule once while creating the optimizer's state, before any step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")


def _without_hivemind_tracebacks(record: logging.LogRecord) -> bool:
    """hivemind logs recoverable failures (a peer that vanished mid-download) with their traceback;
    a volunteer needs the one line that says what happened, not the stack."""
    if record.name.startswith("hivemind") and record.exc_info:
        error, message = record.exc_info[1], record.getMessage()
        record.msg = message if str(error) in message else f"{message} ({type(error).__name__}: {error})"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


_DETACHED = False


def detach_children_from_terminal_signals() -> None:
    """Put every process this one forks from now on (hivemind's DHT and averager processes, and the
    p2p daemon the DHT process starts) in a process group of its own.

    A terminal's Ctrl-C goes to its whole foreground process group: the p2p daemon would die at once
    and the peer could neither say goodbye nor shut its averagers down without tracebacks. Detached,
    only the main process gets the signal, and it stops its children in order. Call it once, early,
    in a long-running peer's main process (not in a test process: its children then outlive it).
    """
    global _DETACHED
    if not _DETACHED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_own_process_group)
        _DETACHED = True


def _own_process_group() -> None:
    with contextlib.suppress(OSError):  # already a group or session leader
        os.setpgid(0, 0)
