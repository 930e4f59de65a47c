"""All benchmarks in one run, written to benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks            # the full run (about 10 minutes here)
    .venv/bin/python -m benchmarks --smoke    # tiny sizes, to check that everything still runs

keruta-prefect and prefect-kubernetes are measured in the same run on the same Kubernetes emulator
(see benchmarks/compare.py). Every keruta row runs in the default settings (artifacts mode exec: the
agent holds its files until the flow has collected them over exec) unless its title says otherwise.
Absolute times depend on the machine; the ratios travel better.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path


def _isolate() -> Path:
    """A home of its own for this run; before Prefect is imported (it reads its settings then)."""
    home = Path(tempfile.mkdtemp(prefix="keruta-bench-"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "60"
    os.environ["KERUTA_HOME"] = str(home / "home")
    os.environ["KERUTA_DATABASE_URL"] = f"sqlite:///{home / 'keruta.db'}"
    return home

FULL = {"runs": 30, "durations": (5, 60), "concurrent": 50, "overhead_runs": 20, "fan_out": (200, 20),
        "artifacts": (1024, 10000), "log_lines": 200_000}
SMOKE = {"runs": 3, "durations": (1,), "concurrent": 4, "overhead_runs": 2, "fan_out": (6, 3),
         "artifacts": (2, 50), "log_lines": 2000}


@contextlib.contextmanager
def prefect_server(database: str, home: Path) -> Iterator[str]:
    """A Prefect server for the run: on PostgreSQL (as in production; SQLite answers concurrent writes
    with 503s that clients back off from for 2 s and more), or the test harness on SQLite."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if database == "sqlite":
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60), \
                temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield "the Prefect test harness (SQLite)"
        return
    import prefect.context
    from keruta_harness.postgres import Postgres
    from keruta_harness.processes import prefect_server as server_process

    pg = Postgres().start()
    try:
        pg.create_database("prefect")
        env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "asyncpg")}
        with server_process(env, home / "prefect-server.log") as base, \
                temporary_settings({PREFECT_API_URL: f"{base}/api", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
                prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            # ...process-global too, as a profile or the environment would be (and as prefect_test_harness
            # does): Prefect's own service threads do not inherit the context variables.
            yield f"`prefect server start` on PostgreSQL {pg.bin.parent.name}"
    finally:
        pg.stop()


def machine(server: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    versions = ", ".join(f"{name} {version(name)}" for name in ("prefect", "prefect-kubernetes", "kubernetes", "kmock"))
    return (f"{os.cpu_count()} × {cpu}, {mem / 2**20:.0f} GiB, Python {platform.python_version()}; {versions}; "
            f"Prefect server: {server}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def run(sizes: dict[str, object], out: Path, database: str, home: Path) -> str:
    with prefect_server(database, home) as server:
        return _run(sizes, out, server)


def _run(sizes: dict[str, object], out: Path, server: str) -> str:
    """Every measurement, against the Prefect server of the current settings; the markdown report."""
    from benchmarks import artifacts, compare, throughput

    root = Path(tempfile.mkdtemp(prefix="keruta-bench-clusters-"))
    lines = [f"# Benchmarks — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {machine(server)}.", "",
             "Produced by `.venv/bin/python -m benchmarks`" + (" --smoke (tiny sizes: not results)"
                                                               if sizes is SMOKE else "") + ".", ""]

    def section(title: str, *body: str) -> None:
        lines.extend([f"## {title}", "", *body, ""])
        out.write_text("\n".join(lines) + "\n")  # keep what is measured so far
        print("\n".join([f"## {title}", *body]), flush=True)

    runs = int(sizes["runs"])  # type: ignore[call-overload]
    detection = compare.completion_detection(root, runs)
    k, p, b = (detection[n] for n in ("keruta-prefect", "prefect-kubernetes", "bare official-client watch"))
    section("1. Completion detection",
            f"From the write of the terminal status to the return of the waiting code, {runs} runs each. "
            "keruta-prefect in the default settings (artifacts mode exec): the agent reports, then holds its "
            "files; measured to the return of `wait()` (the outcome; the collection follows). "
            "prefect-kubernetes: `KubernetesJob.trigger().wait_for_completion()` (5 s interval), with the "
            "completion written at a uniformly random moment of its poll cycle. Target: keruta p50 ≤ 20 ms, "
            "p95 ≤ 50 ms.", "",
            "| system | p50 | p95 | p50 as a multiple of keruta's |", "|---|---|---|---|",
            f"| keruta-prefect | {ms(k['p50'])} | {ms(k['p95'])} | 1× |",
            f"| prefect-kubernetes | {ms(p['p50'])} | {ms(p['p95'])} | {p['p50'] / k['p50']:.0f}× |",
            f"| bare official-client watch | {ms(b['p50'])} | {ms(b['p95'])} | "
            f"{b['p50'] / k['p50']:.2f}× (the practical limit) |")

    durations = tuple(sizes["durations"])  # type: ignore[call-overload]
    counts = compare.requests_per_task(root, durations)
    body = ["Requests the API server received for one task whose Pod runs for the given time (each system "
            "on its own emulator); keruta's include the collection of its files over exec (`create pods/exec` "
            "×2: tar, then the release). Target: keruta ≤ 6 and independent of duration.", "",
            "| system | " + " | ".join(f"{d} s task" for d in durations) + " | requests |",
            "|---|" + "---|" * len(durations) + "---|"]
    for name, by_duration in counts.items():
        detail = "; ".join(f"{d} s: " + ", ".join(f"{key} ×{n}" for key, n in sorted(c.items()))
                           for d, c in by_duration.items())
        body.append(f"| {name} | " + " | ".join(str(sum(by_duration[d].values())) for d in durations)
                    + f" | {detail} |")
    section("2. Kubernetes API requests per task", *body)

    tasks = int(sizes["concurrent"])  # type: ignore[call-overload]
    conc = compare.concurrent_tasks(root, tasks, 5)
    section(f"3. {tasks} tasks at once in one process",
            "Each task's Pod runs 5 s; keruta collects each task's files over exec. Target: 1 watch per "
            "namespace.", "",
            "| system | watch connections at the peak | requests | requests/s | wall |", "|---|---|---|---|---|",
            *[f"| {name} | {int(v['peak_watches'])} | {int(v['requests'])} | {v['requests_per_s']:.1f} | "
              f"{v['wall']:.1f} s |" for name, v in conc.items()])

    oh = compare.orchestration_overhead(root, int(sizes["overhead_runs"]))  # type: ignore[call-overload]
    start_extra = oh["to_create"] - oh["empty_start"]
    end_extra = oh["to_record"] - oh["empty_end"]
    section("4. Orchestration overhead",
            f"The keruta-task flow on the Kubernetes backend in the default settings (artifacts mode exec), medians "
            f"of {int(oh['runs'])} runs, against an empty Prefect flow in the same server and process, the two taking "
            "turns. After the agent's final "
            "report: the outcome, the collection of its files over exec (tar, release), the run recorded. "
            "Target: ≤ 100 ms above the empty flow.", "",
            "| step | keruta-task | empty flow | above it |", "|---|---|---|---|",
            f"| flow start → Job create received (empty: → flow body) | {ms(oh['to_create'])} | "
            f"{ms(oh['empty_start'])} | {ms(start_extra)} |",
            f"| final report → files collected, run recorded (empty: body end → return) | {ms(oh['to_record'])} | "
            f"{ms(oh['empty_end'])} | {ms(end_extra)} |",
            f"| final report → flow returned (summary, artifacts, event) | {ms(oh['to_return'])} | | |")

    n, concurrency = sizes["fan_out"]  # type: ignore[misc]
    fan = throughput.fan_out(int(n), int(concurrency))
    section("5. Fan-out through keruta-pipeline",
            f"{fan['tasks']} tasks (`true`) on the local backend, {fan['concurrency']} at a time, each a child "
            "flow run under a global concurrency limit. Overhead per task = (wall − ⌈tasks / concurrency⌉ × "
            "the median agent run) / tasks. CPU per task: this process (Prefect client, flows, embedded keruta "
            "API) and the agent processes; the Prefect server's own CPU comes on top. Targets: ≤ 150 ms/task "
            "overhead, ≤ 500 MB RSS.", "",
            "| tasks | completed | wall | median agent run | overhead per task | CPU per task: flows / agent "
            "| peak RSS |", "|---|---|---|---|---|---|---|",
            f"| {fan['tasks']} | {fan['completed']} | {fan['wall']:.1f} s | {ms(fan['agent_median'])} | "
            f"{ms(fan['overhead_per_task'])} | {ms(fan['cpu_flow_per_task'])} / {ms(fan['cpu_agent_per_task'])} "
            f"| {fan['peak_rss'] / 2**20:.0f} MiB |")

    big, small = sizes["artifacts"]  # type: ignore[misc]
    rows = artifacts.measure(int(big), int(small))
    section("6. Artifact collection",
            "Over exec (tar on a real WebSocket, streamed into the safe extractor: data filter, caps, "
            "sha256, staged writes) against `tar cf - | cat` of the same files. Targets: ≥ 0.7×, RSS growth "
            "≤ 100 MB. prefect-kubernetes has no artifact collection.", "",
            "| case | keruta | tar \\| cat | ratio | peak RSS growth |", "|---|---|---|---|---|",
            *[f"| {r['case']} | {float(r['bytes']) / 2**20 / float(r['keruta_s']):.0f} MiB/s "
              f"({float(r['keruta_s']):.2f} s) | {float(r['bytes']) / 2**20 / float(r['tar_s']):.0f} MiB/s "
              f"({float(r['tar_s']):.2f} s) | {float(r['ratio']):.2f}× | "
              f"{float(r['rss_growth']) / 2**20:.1f} MiB |" for r in rows])

    logs = throughput.log_streaming(int(sizes["log_lines"]))  # type: ignore[call-overload]
    section("7. Log streaming",
            "A chatty agent (`seq 1 N`) on the local backend: every line through the keruta API into the "
            "database, exactly once and in order. prefect-kubernetes reads Pod logs only when the Job ends "
            "and does not store them.", "",
            "| lines | stored | in order | agent run | lines/s |", "|---|---|---|---|---|",
            f"| {logs['lines']} | {logs['stored']} | {'yes' if logs['in_order'] else 'NO'} | "
            f"{logs['agent_seconds']:.2f} s | {logs['lines_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that everything runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--prefect-db", choices=["postgresql", "sqlite"], default=None,
                        help="the Prefect server's database (default: postgresql when installed, else sqlite)")
    args = parser.parse_args()
    home = _isolate()
    from keruta_harness.postgres import pg_bin

    database = args.prefect_db or ("postgresql" if pg_bin() and not args.smoke else "sqlite")
    out = args.out or (home / "RESULTS.md" if args.smoke else Path(__file__).parent / "RESULTS.md")
    run(SMOKE if args.smoke else FULL, out, database, home)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
