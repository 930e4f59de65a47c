"""Fan-out through keruta-pipeline and log streaming, on the local backend (agents are real processes)."""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from benchmarks.artifacts import vm_hwm
from benchmarks.cpu import Servers


def fan_out(tasks: int, concurrency: int) -> dict[str, Any]:
    """``tasks`` trivial tasks through keruta-pipeline, ``concurrency`` at once, under the global limit."""
    from keruta_prefect.limits import ensure_concurrency_limit
    from keruta_prefect.pipelines import keruta_pipeline
    from keruta_prefect.store import get_store

    limit = f"keruta-bench-{uuid.uuid4().hex[:6]}"
    from prefect import flow

    @flow(name="bench-setup")
    def setup() -> None:
        ensure_concurrency_limit(limit, concurrency)

    setup()
    prefix = f"fan-{uuid.uuid4().hex[:6]}"
    children = [{"id": f"{prefix}-{i:04d}", "script": "true"} for i in range(tasks)]
    servers = Servers().start()
    cpu_before = _cpu()
    started = time.perf_counter()
    result = keruta_pipeline(children=children, concurrency=concurrency, concurrency_limit=limit)
    wall = time.perf_counter() - started
    cpu_self, cpu_agents = (after - before for after, before in zip(_cpu(), cpu_before, strict=True))
    cpu_servers = servers.stop()
    store = get_store()
    agent = []
    for child in children:
        [run] = store.runs(child["id"])
        assert run.finished_at is not None
        agent.append((run.finished_at - run.started_at).total_seconds())
    # What the tasks cost beyond their own run: the wall time above ceil(tasks / concurrency) waves of the
    # median agent run, shared out over the tasks.
    ideal = -(-tasks // concurrency) * statistics.median(agent)
    return {"tasks": tasks, "concurrency": concurrency, "wall": wall, "completed": result.counts().get("COMPLETED", 0),
            "agent_median": statistics.median(agent), "overhead_per_task": (wall - ideal) / tasks,
            "cpu_flow_per_task": cpu_self / tasks, "cpu_agent_per_task": cpu_agents / tasks,
            "cpu_server_per_task": cpu_servers / tasks, "peak_rss": vm_hwm()}


def flow_run_floor(runs: int) -> dict[str, float]:
    """What Prefect itself costs, before keruta does anything: CPU (this process; the Prefect server and its
    database) per empty child flow run, and per empty task run, called one after another from a parent flow.
    A keruta task is one child flow run with five task runs (and a task run that runs it in the pipeline)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(name="empty-task", cache_policy=NO_CACHE)
    def empty_task() -> None:
        return None

    @flow(name="empty-child")
    def empty_child() -> None:
        return None

    @flow(name="bench-floor-tasks")
    def tasks_(n: int) -> None:
        for _ in range(n):
            empty_task()

    @flow(name="bench-floor-children")
    def children(n: int) -> None:
        for _ in range(n):
            empty_child()

    out: dict[str, float] = {"runs": runs}
    for name, parent in (("task_run", tasks_), ("flow_run", children)):
        parent(2)  # warm
        servers = Servers().start()
        before = _cpu()[0]
        parent(runs)
        own = _cpu()[0] - before
        out[f"{name}_client"], out[f"{name}_server"] = own / runs, servers.stop() / runs
    return out


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of its finished child processes (the agents)."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def log_streaming(lines: int) -> dict[str, Any]:
    """A chatty agent: ``lines`` lines as fast as the shell prints them, to the stored log; none lost."""
    from keruta_prefect.flows import keruta_task
    from keruta_prefect.store import get_store

    task_id = f"chatty-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    result = keruta_task(task_spec={"id": task_id, "script": f"seq 1 {lines}"})
    wall = time.perf_counter() - started
    store = get_store()
    stored = [row.message for row in store.logs(task_id)]
    [run] = store.runs(task_id)
    assert run.finished_at is not None
    agent_seconds = (run.finished_at - run.started_at).total_seconds()
    return {"lines": lines, "stored": len(stored), "in_order": stored == [str(i) for i in range(1, lines + 1)],
            "status": str(result.status), "agent_seconds": agent_seconds, "wall": wall,
            "lines_per_s": lines / agent_seconds}
