"""What the task's script used: CPU seconds, peak memory, wall time and bytes of output (standard library only).

Two ways to measure, chosen once per script by :func:`container_cgroup`:

- **cgroup** (:attr:`UsageSource.CGROUP`): the agent runs in a container of its own (a Pod's): cgroup v2,
  ``/proc/self/cgroup`` is exactly ``0::/`` (the container's namespaced root), ``cpu.stat`` and
  ``memory.peak`` are readable, and nothing but the agent (and its ancestors: a container's init) is in the
  cgroup yet. CPU is the ``usage_usec`` of ``cpu.stat`` over the script's run; peak memory is
  ``memory.peak``, the container's high-water mark. **The container's figures include the agent itself**
  (a few tens of MB, a little CPU for shipping the lines): they are what the container's requests and
  limits are compared with.
- **rusage** (:attr:`UsageSource.RUSAGE`), everywhere else (the local backend; the harness's kubelet, which
  runs the agent as a local process): CPU is the ``getrusage(RUSAGE_CHILDREN)`` user + system time over the
  script's run (the script and every descendant that was waited for). ``ru_maxrss`` (KiB on Linux) is the
  largest *single* process, so the script's process tree is also sampled in ``/proc`` while it runs
  (:data:`SAMPLE_SECONDS` while a memory limit is enforced, else :data:`MEASURE_SECONDS`) and the peak is the
  larger of ``ru_maxrss`` and the largest sum of the tree's RSS: a tree of processes is measured as a tree.
  The agent runs one script per process, so its children's figures are the script's. (Linux starts a child's
  ``ru_maxrss`` at the RSS of the process that forked it, the agent: ``ru_maxrss`` counts only when it is
  above the agent's own, else the samples alone say.)

A memory limit (``KERUTA_MEMORY_LIMIT``, bytes; the local backend's, which has no cgroup) is enforced as a
cgroup would: when the tree's RSS goes over it the tree is killed (SIGKILL), and a script whose peak went over
it between two samples counts as killed too (:attr:`ScriptMeter.over_limit`).
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keruta_prefect.contract import UsageKey, UsageSource

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
# How often the script's process tree is sampled in /proc (its RSS). One look reads every process' stat
# file (about 5 ms on a busy 2-core machine): often while a memory limit is enforced, so an allocation is
# caught early; less often when only measuring, so many agents on one machine do not spend a core on it.
# In a container of its own (cgroup v2) with no limit to enforce the agent does not sample at all.
SAMPLE_SECONDS = 0.1
MEASURE_SECONDS = 0.5
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Measured:
    """What one script used. ``as_report()`` is the ``usage`` of the agent's final status."""

    cpu_seconds: float
    peak_memory_bytes: int
    wall_seconds: float
    log_bytes: int
    source: UsageSource

    def as_report(self) -> dict[str, Any]:
        # A peak of 0 was not seen (the script ended before a sample, under the agent's own high-water mark):
        # unknown, sent as null, never as "used nothing".
        return {UsageKey.CPU_SECONDS: round(self.cpu_seconds, 3),
                UsageKey.PEAK_MEMORY_BYTES: self.peak_memory_bytes or None,
                UsageKey.WALL_SECONDS: round(self.wall_seconds, 3), UsageKey.LOG_BYTES: self.log_bytes,
                UsageKey.SOURCE: self.source.value}


# --- cgroup v2 ---------------------------------------------------------------------------------------------

def container_cgroup(root: Path = CGROUP_ROOT, proc: Path = PROC) -> Path | None:
    """``root`` when it is the agent's own container cgroup (see the module), else None."""
    try:
        if (proc / "self" / "cgroup").read_text().strip() != "0::/":
            return None  # cgroup v1 or hybrid, or a cgroup that is not this container's root
        members = {int(line) for line in (root / "cgroup.procs").read_text().split()}
        me = int((proc / "self" / "stat").read_text().split(maxsplit=1)[0])
    except (OSError, ValueError, IndexError):
        return None
    if read_cpu_usec(root) is None or read_memory_peak(root) is None:
        return None
    return root if members <= ancestors(me, proc) else None  # anything else in it (a test runner) would count


def read_cpu_usec(root: Path) -> int | None:
    """``usage_usec`` of ``cpu.stat``; None if unreadable."""
    try:
        for line in (root / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def read_memory_peak(root: Path) -> int | None:
    try:
        return int((root / "memory.peak").read_text().strip())
    except (OSError, ValueError):
        return None


# --- /proc ---------------------------------------------------------------------------------------------------

def _stat(proc: Path, pid: int | str) -> tuple[int, int] | None:
    """(parent pid, RSS in bytes) of a process from ``/proc/<pid>/stat``; None if it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name, in parentheses, may hold anything
    try:
        return int(fields[1]), int(fields[21]) * PAGE_SIZE  # fields 4 (ppid) and 24 (rss, pages)
    except (IndexError, ValueError):
        return None


def ancestors(pid: int, proc: Path = PROC) -> set[int]:
    """``pid`` and its ancestors (as far as this /proc shows them)."""
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        found = _stat(proc, pid)
        if found is None:
            break
        pid = found[0]
    return seen


def tree(pid: int, proc: Path = PROC) -> dict[int, int]:
    """The RSS in bytes of ``pid`` and each of its descendants, by pid (one scan of /proc)."""
    return TreeScanner(proc).scan(pid)


class TreeScanner:
    """Scans of one process tree in /proc, each as :func:`tree` would find it, without reading again the stat
    file of every other process of the machine: a process that was outside the tree stays outside (its parent
    can only change to a reaper, which would be in the tree only if the process already was), so it is
    remembered, by pid and by the inode of its /proc directory (a new process that got its pid has another),
    and only the tree's members and processes not seen before are read. With hundreds of agents on a machine,
    each sampling its script every MEASURE_SECONDS, a scan stays proportional to the tree, not to the machine."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc
        self._outside: dict[int, int] = {}  # pid -> inode of /proc/<pid>: known not to be in the tree

    def scan(self, pid: int) -> dict[int, int]:
        parent: dict[int, int] = {}
        rss: dict[int, int] = {}
        inodes: dict[int, int] = {}
        try:
            entries = [(int(entry.name), entry.inode()) for entry in os.scandir(self.proc) if entry.name.isdigit()]
        except OSError:
            return {}
        outside = self._outside
        for number, inode in entries:
            if outside.get(number) == inode:
                continue
            found = _stat(self.proc, number)
            if found is not None:
                parent[number], rss[number] = found
                inodes[number] = inode
        if pid not in rss:
            return {}
        children: dict[int, list[int]] = {}
        for child, ppid in parent.items():
            children.setdefault(ppid, []).append(child)
        members, todo = {}, [pid]
        while todo:
            current = todo.pop()
            if current not in members:
                members[current] = rss[current]
                todo.extend(children.get(current, ()))
        self._outside = {number: inode for number, inode in entries
                         if number not in members and (outside.get(number) == inode or number in inodes)}
        return members


# --- one script's measurement ----------------------------------------------------------------------------------

def _children_cpu_and_maxrss() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


def own_high_water(proc: Path = PROC) -> int:
    """The most memory this process has held (VmHWM): where the ru_maxrss of a child it forks starts. Not
    its own ru_maxrss, which starts at its parent's memory in turn (a flow process' hundreds of MB)."""
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ScriptMeter:
    """Measures one script: :meth:`begin` before it starts, :meth:`watch` once it runs (its process id),
    :meth:`add_output` for each chunk it writes, :meth:`script_ended` when its process has ended, :meth:`finish`
    after its output is drained."""

    def __init__(self, memory_limit: int | None = None, *, interval: float | None = None,
                 cgroup_root: Path = CGROUP_ROOT, proc: Path = PROC) -> None:
        self.memory_limit = memory_limit
        self.interval = interval if interval is not None else (
            SAMPLE_SECONDS if memory_limit is not None else MEASURE_SECONDS)
        self.proc = proc
        self._cgroup_root = cgroup_root
        self.cgroup: Path | None = None
        self.sampled_peak = 0  # the largest sum of the tree's RSS seen
        self.killed = False  # the tree went over the memory limit and was killed
        self._output = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._ended: float | None = None
        self._peak = 0
        self._pid = 0
        self._cpu_usec: int | None = None
        self._rusage = (0.0, 0)
        self._scanner = TreeScanner(proc)

    def begin(self) -> None:
        self.cgroup = container_cgroup(self._cgroup_root, self.proc)
        self._cpu_usec = read_cpu_usec(self.cgroup) if self.cgroup is not None else None
        cpu, maxrss = _children_cpu_and_maxrss()
        # A child's ru_maxrss starts at its parent's high-water mark (Linux records the memory it leaves at
        # exec, the agent's own): only above both it says something about the script.
        self._rusage = (cpu, max(maxrss, own_high_water()))
        self._started = time.monotonic()

    def watch(self, pid: int) -> None:
        """Sample the tree of ``pid`` until :meth:`finish` (and enforce the memory limit)."""
        self._pid = pid
        if self.cgroup is not None and self.memory_limit is None:
            return  # memory.peak has the peak; nothing to enforce
        self.sample()  # a first look at once: a script that ends at once has its shell measured at least
        self._thread = threading.Thread(target=self._run, name="keruta-usage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        members = self._scanner.scan(self._pid)
        total = sum(members.values())
        self.sampled_peak = max(self.sampled_peak, total)
        if self.memory_limit is not None and total > self.memory_limit and not self.killed:
            self.killed = True
            kill_tree(self._pid, members)

    def script_ended(self) -> None:
        """The script's process has ended: its wall time ends here, not after its output is drained."""
        if self._ended is None:
            self._ended = time.monotonic()

    def add_output(self, count: int) -> None:
        with self._lock:
            self._output += count

    def finish(self) -> Measured:
        """Stop sampling; what the script used from :meth:`begin` to now."""
        wall = (self._ended if self._ended is not None else time.monotonic()) - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        cpu_before, maxrss_before = self._rusage
        cpu_after, maxrss_after = _children_cpu_and_maxrss()
        # ru_maxrss is a high-water mark over every child this process ever had (and the agent's own memory
        # at the fork): it says something about this script only when the script raised it above them.
        peak = max(self.sampled_peak, maxrss_after if maxrss_after > maxrss_before else 0)
        cpu, source = max(0.0, cpu_after - cpu_before), UsageSource.RUSAGE
        if self.cgroup is not None:
            usec, cgroup_peak = read_cpu_usec(self.cgroup), read_memory_peak(self.cgroup)
            if usec is not None and self._cpu_usec is not None and cgroup_peak is not None:
                cpu, peak, source = max(0, usec - self._cpu_usec) / 1e6, cgroup_peak, UsageSource.CGROUP
        self._peak = peak
        with self._lock:
            output = self._output
        return Measured(cpu_seconds=cpu, peak_memory_bytes=peak, wall_seconds=wall, log_bytes=output, source=source)

    @property
    def over_limit(self) -> bool:
        """The script was killed for its memory, or its peak went over the limit between two samples (a
        cgroup would have killed it). Meaningful after :meth:`finish`."""
        return self.memory_limit is not None and (self.killed or self._peak > self.memory_limit)


def kill_tree(pid: int, members: dict[int, int]) -> None:
    """SIGKILL the script's process group and every process of its tree (one that left the group too)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for target in members:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def mebibytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
