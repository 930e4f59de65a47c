"""A throwaway PostgreSQL server on loopback, from Debian's `postgresql` package (.ci/run installs it).

Used by the PostgreSQL tier of the test suite and by the benchmarks (for the Prefect server's own
database). Runs as the `postgres` user when started by root (initdb refuses root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .processes import free_port, prefect_server


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return candidates[-1].parent if candidates else None


class Postgres:
    def __init__(self, root: Path | None = None) -> None:
        binary = pg_bin()
        if binary is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = binary
        # Its own directory under /tmp: the postgres user cannot enter root's 0700 temporary folders.
        self.root = root or Path(tempfile.mkdtemp(prefix="keruta-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = list(command)
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=300 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not start: {(self.root / 'log').read_text()[-1000:]}")

    def create_database(self, name: str) -> None:
        self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q", "-c",
                  f'CREATE DATABASE "{name}"')

    def url(self, database: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def prefect_on_postgres(pg: Postgres, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`prefect server start` backed by a fresh database of ``pg`` (as in production: SQLite answers
    concurrent writes with 503s); yields its base URL (the API is under /api)."""
    name = f"prefect_{os.urandom(4).hex()}"
    pg.create_database(name)
    server_env = {**os.environ, **(env or {}), "PREFECT_API_DATABASE_CONNECTION_URL": pg.url(name, "asyncpg"),
                  "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL", None)
    with prefect_server(server_env, log_path, timeout=180) as base:
        yield base
