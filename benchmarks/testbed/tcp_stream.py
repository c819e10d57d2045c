"""Plain TCP between testbed hosts (plain Python, no iperf): one link's throughput, or the
all-to-all exchange an all-reduce makes, without the all-reduce.

    python -m benchmarks.testbed.tcp_stream receive --bind ADDR --port P --skip-s 0.5
    python -m benchmarks.testbed.tcp_stream send --to ADDR --port P --seconds 3
    python -m benchmarks.testbed.tcp_stream exchange --me I --addresses A,B,C --port P --bytes N

The receiver prints ``listening`` once it accepts connections, and at the end one JSON line: the
bytes received and the rate in Mbit/s of TCP payload, counted from ``skip_s`` after the first byte
(TCP's slow start and tbf's initial full bucket are not what a cap means) to the last.
:meth:`benchmarks.testbed.Testbed.measure_mbit` runs both inside a testbed.

``exchange`` runs on every host at once (:meth:`benchmarks.testbed.Testbed.measure_exchange`): it
prints ``listening``, reads ``go <unix time>`` on stdin, connects to every other host, and from that
instant sends ``N`` bytes to each of them while receiving as many from each; then one JSON line, the
seconds until its last byte arrived. Standard library only, and imported by nothing, so that
``python -m`` runs it without a second copy of the module.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK = 1 << 16


def receive(bind: str, port: int, skip_s: float) -> dict[str, float]:
    with socket.create_server((bind, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            first = window_start = None
            total = window_bytes = 0
            last = time.monotonic()
            while data := conn.recv(CHUNK):
                last = time.monotonic()
                total += len(data)
                if first is None:
                    first = last
                elif window_start is None and last - first >= skip_s:
                    window_start = last
                elif window_start is not None:
                    window_bytes += len(data)
    seconds = last - window_start if window_start is not None else 0.0
    mbit = window_bytes * 8 / seconds / 1e6 if seconds > 0 else 0.0
    return {"bytes": total, "seconds": seconds, "mbit": mbit}


def send(to: str, port: int, seconds: float) -> None:
    payload = b"\0" * CHUNK
    with socket.create_connection((to, port), timeout=30) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(payload)


def exchange(
    me: int, addresses: list[str], port: int, nbytes: int, connect_timeout_s: float = 30.0
) -> dict[str, float]:
    """Send ``nbytes`` to every other host and receive as many from each, all at once: one TCP
    connection per pair and direction, each sent from its own thread. ``connect_timeout_s`` bounds
    connecting only, however long the transfer takes."""
    others = [a for i, a in enumerate(addresses) if i != me]
    received_at: list[tuple[int, float]] = []  # (bytes, when the last of them arrived) per sender
    with socket.create_server((addresses[me], port), backlog=len(others)) as server:
        print("listening", flush=True)

        def receive_all() -> None:
            conn, _ = server.accept()
            with conn:
                received = 0
                while received < nbytes and (data := conn.recv(CHUNK)):
                    received += len(data)
            received_at.append((received, time.time()))

        receivers = [threading.Thread(target=receive_all) for _ in others]
        for thread in receivers:
            thread.start()
        start = float(sys.stdin.readline().split()[1])
        conns = [socket.create_connection((a, port), timeout=connect_timeout_s) for a in others]
        payload = memoryview(b"\0" * nbytes)

        def send_all(conn: socket.socket) -> None:
            # The connect timeout would also bound sendall's whole duration (Python >= 3.5), and a
            # large exchange on a slow link outlasts it. A sender that fails closes its connection at
            # once, so that the other host's receiver sees the end instead of waiting forever.
            conn.settimeout(None)
            try:
                conn.sendall(payload)
            except OSError:
                conn.close()
                raise

        senders = [threading.Thread(target=send_all, args=(conn,)) for conn in conns]
        time.sleep(max(start - time.time(), 0.0))
        for thread in senders:
            thread.start()
        for thread in senders + receivers:
            thread.join()
        for conn in conns:
            conn.close()
    if any(received != nbytes for received, _ in received_at):
        raise SystemExit(f"received {sorted(r for r, _ in received_at)} bytes, expected {nbytes} from each")
    return {"seconds": max(t for _, t in received_at) - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    recv = sub.add_parser("receive")
    recv.add_argument("--bind", required=True)
    recv.add_argument("--port", type=int, required=True)
    recv.add_argument("--skip-s", type=float, default=0.5)
    snd = sub.add_parser("send")
    snd.add_argument("--to", required=True)
    snd.add_argument("--port", type=int, required=True)
    snd.add_argument("--seconds", type=float, default=3.0)
    exch = sub.add_parser("exchange")
    exch.add_argument("--me", type=int, required=True)
    exch.add_argument("--addresses", required=True, help="every host's address, comma-separated")
    exch.add_argument("--port", type=int, required=True)
    exch.add_argument("--bytes", type=int, required=True, help="sent to each other host")
    exch.add_argument("--connect-timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    if args.command == "receive":
        print(json.dumps(receive(args.bind, args.port, args.skip_s)), flush=True)
    elif args.command == "exchange":
        result = exchange(args.me, args.addresses.split(","), args.port, args.bytes, args.connect_timeout_s)
        print(json.dumps(result), flush=True)
    else:
        send(args.to, args.port, args.seconds)


if __name__ == "__main__":
    main()
