"""All benchmarks in one run, written to benchmarks/RESULTS.md and benchmarks/results.json (its figures).

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
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Sizes:
    runs: int  # completion detection, per system
    durations: tuple[int, ...]  # seconds a Pod runs, for the requests per task
    concurrent: int  # tasks at once
    overhead_runs: int
    fan_out: tuple[int, int]  # tasks, concurrency
    floor_runs: int  # empty flow runs and task runs, for Prefect's own cost
    agent_runs: int  # agent cold starts
    scale: tuple[int, int, int]  # tasks at once; keruta-pipeline tasks and concurrency at scale
    artifacts: tuple[int, int]  # MiB of the large file, number of small files
    log_lines: int


FULL = Sizes(runs=30, durations=(5, 60), concurrent=50, overhead_runs=20, fan_out=(200, 20), floor_runs=40,
             agent_runs=20, artifacts=(1024, 10000), log_lines=200_000,
             scale=(1000, 200, 100))
SMOKE = Sizes(runs=3, durations=(1,), concurrent=4, overhead_runs=2, fan_out=(6, 3), floor_runs=2, agent_runs=2,
              artifacts=(2, 50), log_lines=2000, scale=(4, 2, 2))
CONCURRENT_POD_RUN_S = 5  # how long each Pod of section 3 runs


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
            from benchmarks import cpu

            cpu.SERVERS[:] = [*cpu.server_children(), *filter(None, [cpu.postmaster(pg.data)])]
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


@dataclass
class Report:
    """What a run measured: its figures (results.json), the words it adds (notes), RESULTS.md's text."""
    figures: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    text: str = ""


def results_json(out: Path) -> Path:
    """results.json beside RESULTS.md."""
    return out.parent / "results.json"


def run(sizes: Sizes, out: Path, database: str, home: Path) -> Report:
    with prefect_server(database, home) as server:
        return _run(sizes, out, server)


def _run(sizes: Sizes, out: Path, server: str) -> Report:
    """Every measurement, against the Prefect server of the current settings. After each one, RESULTS.md
    (rendered from the figures: benchmarks/report.py) and results.json (the figures) hold what is measured
    so far."""
    from benchmarks import agent, artifacts, compare, report, scale, throughput

    root = Path(tempfile.mkdtemp(prefix="keruta-bench-clusters-"))
    header = "\n".join([f"# Benchmarks — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
                        f"Machine: {machine(server)}.", "",
                        "Produced by `.venv/bin/python -m benchmarks`" + (" --smoke (tiny sizes: not results)"
                                                                          if sizes is SMOKE else "")
                        + f", with `{results_json(out).name}` beside it (the same figures).", "", ""])
    done = Report()

    def measured(figures: dict[str, float], section: report.Section, **notes: str) -> None:
        done.figures.update(figures)
        done.notes.update(notes)
        done.text = header + report.render(done.figures, done.notes)
        out.write_text(done.text)  # keep what is measured so far
        results_json(out).write_text(json.dumps(done.figures, indent=1) + "\n")
        print("\n".join(section(done.figures, done.notes)), flush=True)

    detection = compare.completion_detection(root, sizes.runs)
    measured(report.completion_figures(detection, sizes.runs), report.render_completion)
    measured(report.request_figures(compare.requests_per_task(root, sizes.durations)), report.render_requests)
    concurrent = compare.concurrent_tasks(root, sizes.concurrent, CONCURRENT_POD_RUN_S)
    measured(report.concurrent_figures(concurrent, sizes.concurrent, CONCURRENT_POD_RUN_S), report.render_concurrent)
    measured(report.overhead_figures(compare.orchestration_overhead(root, sizes.overhead_runs)),
             report.render_overhead)
    measured(report.agent_figures(agent.cold_start(sizes.agent_runs)), report.render_agent)
    measured(report.fanout_figures(throughput.fan_out(*sizes.fan_out)), report.render_fanout)
    measured(report.floor_figures(throughput.flow_run_floor(sizes.floor_runs)), report.render_fanout)
    collected = artifacts.measure(*sizes.artifacts)
    measured(report.artifacts_figures(collected), report.render_artifacts, **report.artifacts_notes(collected))
    measured(report.log_figures(throughput.log_streaming(sizes.log_lines)), report.render_logs)
    at_once, pipeline_tasks, pipeline_concurrency = sizes.scale
    figures = scale.thousand(root, at_once)
    measured(report.scale_figures(figures | scale.pipeline_scale(pipeline_tasks, pipeline_concurrency, root)),
             report.render_scale)
    return done


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
    print(f"written: {out}, {results_json(out)}")


if __name__ == "__main__":
    main()
