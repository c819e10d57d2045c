"""Measure a link's real throughput with one TCP stream between two hosts (plain Python, no iperf).

    python -m benchmarks.testbed.tcp_stream receive --bind ADDR --port P --skip-s 0.5
    python -m benchmarks.testbed.tcp_stream send --to ADDR --port P --seconds 3

The receiver prints ``listening`` once it accepts connections, and at the end one JSON line: the
bytes received and the rate in Mbit/s of TCP payload, counted from ``skip_s`` after the first byte
(TCP's slow start and tbf's initial full bucket are not what a cap means) to the last.
:meth:`benchmarks.testbed.Testbed.measure_mbit` runs both inside a testbed. Standard library only,
and imported by nothing, so that ``python -m`` runs it without a second copy of the module.
"""

from __future__ import annotations

import argparse
import json
import socket
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
    args = parser.parse_args()
    if args.command == "receive":
        print(json.dumps(receive(args.bind, args.port, args.skip_s)), flush=True)
    else:
        send(args.to, args.port, args.seconds)


if __name__ == "__main__":
    main()
