"""``make bench``: run every benchmark with its default (quick) settings, results under runs/bench/.

Each benchmark is also its own entry point with more options (``python -m benchmarks.NAME --help``);
BENCHMARKS.md records the numbers and the exact command that produced each table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "bench_kv_cache": ["--batch-size", "1", "16", "64"],
    "bench_swarm_throughput": [],
}


def main() -> None:
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args in BENCHMARKS.items():
        print(f"\n== {name} ==", flush=True)
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out / f"{name}.json")]
        if subprocess.run(cmd).returncode:
            failed.append(name)
    print(f"\nresults in {out}/" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
