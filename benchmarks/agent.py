"""The agent's cold start and its CPU per trivial task (issue 15, part 1): what every task pays for before and
around its script.

- ``agent_import_ms``: CPU of the import of the agent's entry module (keruta_prefect.agent.cli, what
  ``python -m keruta_prefect.agent`` loads) and of the HTTP stack its client loads at the first request, timed
  inside a fresh interpreter;
- ``agent_cpu_ms_per_true_task``: user + system CPU of one agent process (and the ``true`` it runs) from start
  to exit, as the local backend launches it against the embedded keruta API (os.wait4 of that process);
- ``python_bare_cpu_ms``: the same interpreter doing nothing (``python -c pass``): the floor under both.

Each figure is the median over ``runs``. ``python -m benchmarks.agent [RUNS]`` prints them.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The entry module, and the HTTP stack the client loads at its first request (http.client, email): what an agent
# loads before it does anything. CPU time: on a machine other work shares, wall time says more about that work.
IMPORT_TIMER = ("import time\nstarted = time.process_time()\nimport keruta_prefect.agent.cli\n"
                "from keruta_prefect.client import wire\n"
                "print((time.process_time() - started) * 1000)\n")


def _cpu_ms(usage: resource.struct_rusage) -> float:
    return (usage.ru_utime + usage.ru_stime) * 1000


def _child_cpu_ms(command: list[str]) -> float:
    """CPU of one process (and what it waited for), start to exit."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped above
    return _cpu_ms(usage)


def import_ms(runs: int) -> float:
    times = [float(subprocess.run([sys.executable, "-c", IMPORT_TIMER], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(runs)]
    return statistics.median(times)


def agent_cpu_ms(runs: int) -> tuple[float, float]:
    """(median CPU ms, median wall ms) of one agent process running a ``true`` task, launched by the local
    backend against its embedded API (in this process, as in a flow)."""
    from keruta_prefect.backends.local import LocalBackend
    from keruta_prefect.models import RunContext, Task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import get_store

    store = get_store()
    backend = LocalBackend(KerutaSettings(), store)
    cpu, wall = [], []
    for _ in range(runs + 1):  # the first one warms the embedded API up (started on first use)
        task = store.create_task(Task.model_validate({"id": f"cold-{uuid.uuid4().hex[:8]}", "script": "true"}))
        started = time.perf_counter()
        handle = backend.launch(task, RunContext(flow_run_id="bench", attempt=1))
        assert handle.pid is not None
        _pid, status, usage = os.wait4(handle.pid, 0)
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append(_cpu_ms(usage))
        got = store.get_task(task.id).status
        assert os.waitstatus_to_exitcode(status) == 0 and got == "COMPLETED", (status, got)
    return statistics.median(cpu[1:]), statistics.median(wall[1:])


def cold_start(runs: int) -> dict[str, float]:
    cpu, wall = agent_cpu_ms(runs)
    return {"agent_import_ms": import_ms(runs), "agent_cpu_ms_per_true_task": cpu, "agent_wall_ms_per_true_task": wall,
            "python_bare_cpu_ms": statistics.median(_child_cpu_ms([sys.executable, "-c", "pass"])
                                                    for _ in range(runs))}


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    if "KERUTA_HOME" not in os.environ:  # a home and database of its own, as `python -m benchmarks` makes
        home = Path(tempfile.mkdtemp(prefix="keruta-bench-agent-"))
        os.environ["KERUTA_HOME"] = str(home)
        os.environ["KERUTA_DATABASE_URL"] = f"sqlite:///{home / 'keruta.db'}"
    for name, value in cold_start(runs).items():
        print(f"{name}: {value:.1f}")


if __name__ == "__main__":
    main()
