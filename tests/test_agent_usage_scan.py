"""The agent's repeated scans of its script's process tree read only the tree and the processes they have not
seen: on a fake /proc, each scan finds exactly what a full scan (usage.tree) finds, and reads no more than that."""

from __future__ import annotations

from pathlib import Path

import pytest

from keruta_prefect.agent import usage
from keruta_prefect.agent.usage import TreeScanner, tree


def _process(proc: Path, pid: int, ppid: int, pages: int = 1) -> None:
    """A /proc/<pid> whose stat says its parent and its RSS; a new directory (a new inode) if it was there."""
    fresh = proc / f"new-{pid}"
    fresh.mkdir()
    (fresh / "stat").write_text(f"{pid} (a b) c) S {ppid} " + " ".join(["0"] * 19) + f" {pages} 0 0\n")
    if (proc / str(pid)).exists():
        (proc / str(pid) / "stat").unlink()
        (proc / str(pid)).rmdir()
    fresh.rename(proc / str(pid))


def test_repeated_scans_find_what_a_full_scan_finds_and_read_only_the_tree_and_new_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    for pid, ppid in ((1, 0), (10, 1), (11, 10), (20, 1), (21, 20), (30, 1)):
        _process(proc, pid, ppid)
    reads: list[int] = []
    real_stat = usage._stat
    monkeypatch.setattr(usage, "_stat", lambda where, pid: reads.append(int(pid)) or real_stat(where, pid))
    scanner = TreeScanner(proc)

    def scan() -> dict[int, int]:
        reads.clear()
        found = scanner.scan(10)
        done = len(reads)
        assert found == tree(10, proc)
        del reads[done:]
        return found

    assert sorted(scan()) == [10, 11] and sorted(reads) == [1, 10, 11, 20, 21, 30]
    assert sorted(scan()) == [10, 11] and sorted(reads) == [10, 11]  # the rest of the machine is not read again
    _process(proc, 12, 11, pages=5)  # a grandchild appears
    _process(proc, 21, 12)  # pid 21 ended and a new process of the tree got its pid
    page = usage.PAGE_SIZE
    assert scan() == {10: page, 11: page, 12: 5 * page, 21: page}
    assert sorted(reads) == [10, 11, 12, 21]  # the tree, and what is new (21 is another process now)
    _process(proc, 11, 1)  # the child left the tree (reparented); its own child goes with it
    assert sorted(scan()) == [10]
    (proc / "10" / "stat").unlink()
    (proc / "10").rmdir()
    assert scan() == {}  # the script is gone
