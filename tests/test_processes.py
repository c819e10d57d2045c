"""The process table helpers: process trees and the shared memory killed peers leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dalle_together.processes import descendants, process_stat, remove_orphaned_shared_memory, start_time


def test_descendants_and_start_times_of_a_process_tree():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 10
        while len(tree := descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parent.pid in tree
        (child,) = (s for s in tree.values() if s.ppid == parent.pid)
        assert start_time(child.pid) == child.start_time
        assert process_stat(parent.pid).cpu_s >= 0
    finally:
        for pid in descendants(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait()
    assert start_time(parent.pid) is None


def test_only_old_files_of_dead_creators_are_deleted(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now
    old = time.time() - 3600
    files = {
        "dead_old": tmp_path / f"torch_{gone.pid}_123_0",
        "dead_new": tmp_path / f"torch_{gone.pid}_456_0",
        "alive_old": tmp_path / f"torch_{os.getpid()}_789_0",
        "not_torch": tmp_path / f"other_{gone.pid}_1",
    }
    for name, path in files.items():
        path.write_bytes(b"x")
        if name != "dead_new":
            os.utime(path, (old, old))

    assert remove_orphaned_shared_memory(creators={os.getpid()}, directory=tmp_path) == 0
    assert remove_orphaned_shared_memory(directory=tmp_path) == 1
    assert {name for name, path in files.items() if path.exists()} == {"dead_new", "alive_old", "not_torch"}
    assert remove_orphaned_shared_memory(min_age_s=0, creators={gone.pid}, directory=tmp_path) == 1
