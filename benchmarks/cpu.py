"""CPU seconds of the processes a benchmark does not run in itself: the Prefect server and its database.

The fan-out's CPU split needs them: on this machine the Prefect server spends more CPU on a keruta task's
flow run and task runs than keruta-prefect does. A process's figure is its own user+system time plus that
of its children it has waited for (``/proc/PID/stat`` fields 14–17), and the live children's own."""

from __future__ import annotations

import os
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")

SERVERS: list[int] = []  # pids of the Prefect server and the PostgreSQL postmaster, set by benchmarks.__main__


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process under it (the exited ones it waited for included)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    own = sum(int(value) for value in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
    return own + sum(tree_cpu(child) for child in children(pid))


def servers_cpu() -> float:
    return sum(tree_cpu(pid) for pid in SERVERS)


def postmaster(data: Path) -> int | None:
    """The pid in PostgreSQL's ``postmaster.pid`` (its first line)."""
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def server_children() -> list[int]:
    """This process's children that run `prefect server start`."""
    found = []
    for pid in children(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect" in argv and b"server" in argv:
            found.append(pid)
    return found


_idle: list[float] = []  # the servers' CPU seconds per second when nothing is asked of them (their loop services)


def idle_rate(over: float = 3.0) -> float:
    """The servers' CPU per second of wall time at rest, measured once (call it before loading them)."""
    if not _idle:
        first, started = servers_cpu(), time.monotonic()
        time.sleep(over)
        _idle.append((servers_cpu() - first) / (time.monotonic() - started))
    return _idle[0]


def settled(every: float = 1.0, longest: float = 120.0) -> None:
    """Until the servers are done with what they were sent (the Prefect server handles events after it
    answered): their CPU over ``every`` seconds is back to the idle rate (within 0.02 s/s), or ``longest``
    passed."""
    if not SERVERS:
        return
    rest = idle_rate()
    deadline, last = time.monotonic() + longest, servers_cpu()
    while time.monotonic() < deadline:
        time.sleep(every)
        now = servers_cpu()
        if (now - last) / every <= rest + 0.02:
            return
        last = now


class Servers:
    """The servers' CPU from ``start()`` to ``stop()`` for the work done in between: the CPU they spend until
    they are settled again, less what they spend at rest over that time."""

    def start(self) -> Servers:
        idle_rate()
        self.cpu, self.at = servers_cpu(), time.monotonic()
        return self

    def stop(self) -> float:
        settled()
        return max(0.0, servers_cpu() - self.cpu - idle_rate() * (time.monotonic() - self.at))
