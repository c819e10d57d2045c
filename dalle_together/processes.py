"""The process table, read from ``/proc`` (Linux): process trees, start times, CPU time.

A start time tells a process from a later one that reuses its pid, so whoever records pids to
signal later records start times with them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    ppid: int
    state: str
    """``R``, ``S``, ..., ``Z`` for a zombie (ended, not yet reaped)."""
    start_time: int
    """Clock ticks after boot at which the process started."""
    cpu_s: float
    """User and system CPU seconds used so far."""


def process_stat(pid: int) -> ProcessStat | None:
    """``/proc/PID/stat`` parsed, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: parse after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    return ProcessStat(
        pid=pid,
        ppid=int(fields[1]),
        state=fields[0],
        start_time=int(fields[19]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
    )


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None if it does not exist."""
    stat = process_stat(pid)
    return stat.start_time if stat is not None else None


def descendants(root: int) -> dict[int, ProcessStat]:
    """The living (not zombie) descendants of process ``root``, by pid; empty where there is none."""
    children: dict[int, list[ProcessStat]] = {}
    for entry in Path("/proc").iterdir():
        stat = process_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat.state != "Z":
            children.setdefault(stat.ppid, []).append(stat)
    found: dict[int, ProcessStat] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return found


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and all its descendants at once (a peer's DHT, averagers and p2p daemon;
    they would keep the pipes it shares with its parent open)."""
    for pid in [root, *descendants(root)]:  # listed first: once root dies they are reparented
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by ``root`` and its living descendants (0 if ``root`` is gone)."""
    stat = process_stat(root)
    if stat is None:
        return 0.0
    return stat.cpu_s + sum(child.cpu_s for child in descendants(root).values())


SHARED_MEMORY_DIR = Path("/dev/shm")


def remove_orphaned_shared_memory(
    *, min_age_s: float = 600.0, creators: Collection[int] | None = None, directory: Path = SHARED_MEMORY_DIR
) -> int:
    """Delete torch's shared-memory files whose creator has died; returns how many.

    hivemind shares tensors between a peer's processes with torch's ``file_system`` strategy:
    files ``/dev/shm/torch_<pid>_*`` that are deleted only when the processes using them exit
    cleanly. A peer killed with SIGKILL (or by the out-of-memory killer) leaves its model-sized
    buffers behind, and ``/dev/shm`` is memory: each killed volunteer of a 25M model kept ~200 MB
    of RAM until reboot. A file is removed only if the process named in it is gone and the file is
    older than ``min_age_s`` (a live process that still maps it keeps its mapping anyway), and, if
    ``creators`` is given, only if that process is one of them.
    """
    removed = 0
    now = time.time()
    for path in directory.glob("torch_*_*"):
        creator = path.name.split("_")[1]
        if not creator.isdigit() or Path(f"/proc/{creator}").exists():
            continue
        if creators is not None and int(creator) not in creators:
            continue
        try:
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed
