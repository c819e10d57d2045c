"""``make bench``: run every benchmark, put its table into BENCHMARKS.md and its plot into docs/.

    python -m benchmarks.run [--full] [--only NAME ...] [--no-update]

Each benchmark is also its own entry point with more options (``python -m benchmarks.NAME --help``).
The quick setting (default) takes minutes and leaves its tables and plots in runs/bench/; ``--full``
produces the tables BENCHMARKS.md reports: a benchmark that writes a markdown table replaces the part
of BENCHMARKS.md between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``, so the numbers there are always those of the
last run, with the command that produced them; the rest of the file is prose and stays as is.
Benchmarks that need the testbed (network namespaces) are skipped with the reason where it cannot run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path("runs/bench")
DOCS = Path("docs")
BENCHMARKS_MD = Path("BENCHMARKS.md")


@dataclass(frozen=True)
class Benchmark:
    quick: list[str] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    table: bool = False
    """It writes ``--markdown`` (and ``--plot``) for BENCHMARKS.md."""
    plot: bool = False
    testbed: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    "bench_codec": Benchmark(quick=["--repeats", "10"], full=[]),
    "bench_kv_cache": Benchmark(
        quick=["--batch-size", "1", "16", "64"], full=["--batch-size", "1", "16", "64"]
    ),
    "bench_swarm_throughput": Benchmark(quick=["--seconds", "30", "--warmup", "15"], full=[]),
    "bench_averaging": Benchmark(
        quick=["--quick"],
        full=["--full", "--logs", "runs/bench/bench_averaging-logs"],
        table=True,
        plot=True,
        testbed=True,
    ),
    "bench_scaling": Benchmark(quick=["--quick"], full=["--full"], table=True, plot=True, testbed=True),
    "bench_faults": Benchmark(quick=["--quick"], full=["--full"], table=True, testbed=True),
}


def splice(document: str, name: str, table: str) -> str:
    """``document`` with the block of benchmark ``name`` replaced by ``table`` (appended if absent)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{table.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document)
    return document.rstrip() + f"\n\n{block}\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the settings of the tables in BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--no-update", action="store_true", help="with --full: leave BENCHMARKS.md alone")
    args = parser.parse_args()
    update = args.full and not args.no_update

    OUT.mkdir(parents=True, exist_ok=True)
    available, reason = True, ""
    if any(BENCHMARKS[n].testbed for n in args.only or BENCHMARKS):
        from benchmarks.testbed import testbed_available

        available, reason = testbed_available()
    failed, skipped = [], []
    for name in args.only or BENCHMARKS:
        bench = BENCHMARKS[name]
        if bench.testbed and not available:
            print(f"\n== {name}: skipped ({reason}) ==", flush=True)
            skipped.append(name)
            continue
        print(f"\n== {name} ==", flush=True)
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(bench.full if args.full else bench.quick)]
        cmd += ["--json", str(OUT / f"{name}.json")]
        if bench.table:
            cmd += ["--markdown", str(OUT / f"{name}.md")]
        if bench.plot:
            cmd += ["--plot", str((DOCS if update else OUT) / f"{name}.png")]
        if subprocess.run(cmd).returncode:
            failed.append(name)
            continue
        if bench.table and update:
            table = (OUT / f"{name}.md").read_text()
            BENCHMARKS_MD.write_text(splice(BENCHMARKS_MD.read_text(), name, table))
    print(
        f"\nresults in {OUT}/"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
