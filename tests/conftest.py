"""Shared fixtures: an isolated keruta home per test, a real keruta API on loopback, one Prefect server, and the
cluster of the Kubernetes tests: the harness by default, a real one when the environment names it (see
tests/targets.py for the contract, and `harness_only` for the tests only the harness can run).

Environment first: Prefect reads its settings when imported, so PREFECT_HOME and analytics are set
before anything imports it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="keruta-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["KERUTA_HOME"] = str(_SESSION_DIR / "keruta-home")
for _name in ("KERUTA_DATABASE_URL", "KERUTA_API_TOKEN", "KERUTA_PROPERTIES", "KERUTA_TASK_ID", "KERUTA_API_URL"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

from keruta_prefect.api import ApiServer, create_app  # noqa: E402

if TYPE_CHECKING:
    from keruta_harness.postgres import Postgres
from keruta_prefect.store import Store, get_store  # noqa: E402
from tests.targets import HarnessCluster, RealCluster, Target, real_target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect test server for the whole session, per xdist worker (15-40 s to start on these machines:
    a generous timeout, as two workers may start theirs at once)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180), temporary_settings(
        {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield


@pytest.fixture
def keruta_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh KERUTA_HOME and SQLite database for one test."""
    home = tmp_path / "keruta-home"
    home.mkdir()
    monkeypatch.setenv("KERUTA_HOME", str(home))
    monkeypatch.setenv("KERUTA_DATABASE_URL", f"sqlite:///{home / 'keruta.db'}")
    return home


@pytest.fixture
def store(keruta_home: Path) -> Store:
    return get_store()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL server for the session (Debian's package; .ci/run installs it and sets
    KERUTA_REQUIRE_POSTGRES=1, so there the PostgreSQL tier can never be skipped)."""
    from keruta_harness.postgres import Postgres, pg_bin

    if pg_bin() is None:
        if os.environ.get("KERUTA_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_postgres_server(postgres: Postgres) -> Iterator[str]:
    """A second Prefect server for the session, on PostgreSQL: many concurrent flows belong there (Prefect
    on SQLite answers concurrent writes with 503s). Tests select it with `on_prefect_postgres`."""
    from keruta_harness.postgres import prefect_on_postgres

    with prefect_on_postgres(postgres, _SESSION_DIR / "prefect-postgres.log") as base:
        yield f"{base}/api"


@pytest.fixture
def on_prefect_postgres(prefect_postgres_server: str) -> Iterator[str]:
    """Point this test's Prefect client at the PostgreSQL-backed server."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_postgres_server, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        # ...and the process-global settings too, as prefect_test_harness does: threads do not inherit
        # the context variables temporary_settings sets.
        yield prefect_postgres_server


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, keruta_home: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The store on SQLite and, again, on a fresh PostgreSQL database."""
    if request.param == "postgresql":
        server: Postgres = request.getfixturevalue("postgres")
        name = f"keruta_{uuid.uuid4().hex[:12]}"
        server.create_database(name)
        monkeypatch.setenv("KERUTA_DATABASE_URL", server.url(name))
    return get_store()


class Api:
    """A keruta API served over real HTTP: on loopback and a free port, or where a real cluster's Pods reach it
    (``host``, ``port`` and the ``public_url`` they use: ``Api(..., **cluster.api_binding())``)."""

    def __init__(self, store: Store, artifacts_root: Path, port: int = 0, *, host: str = "127.0.0.1",
                 public_url: str | None = None, **caps: int) -> None:
        self.store = store
        self.token = secrets.token_urlsafe(24)
        self.artifacts_root = artifacts_root
        self.caps = caps
        self.host = host
        self.port = port
        self.public_url = public_url
        self.server: ApiServer | None = None

    def start(self) -> Api:
        app = create_app(self.store, self.token, artifacts_root=self.artifacts_root, **self.caps)
        self.server = ApiServer(app, host=self.host, port=self.port).start()
        self.port = self.server.port
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        return self.public_url or f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def api(store: Store, keruta_home: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    """The test's keruta API; where the test's cluster's Pods reach it, if the test has a cluster."""
    binding = request.getfixturevalue("cluster").api_binding() if "cluster" in request.fixturenames else {}
    server = Api(store, keruta_home / "artifacts", **binding).start()
    yield server
    server.stop()


def run_agent(api: Api, task_id: str, work_dir: Path, *args: str, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """keruta-agent as its own process, against the API over HTTP (as in a Pod)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    full_env.update({"KERUTA_API_TOKEN": api.token, **(env or {})})
    command = [sys.executable, "-m", "keruta_prefect.agent", "run", "--task-id", task_id, "--api-url", api.url,
               "--work-dir", str(work_dir), "--artifacts-dir", str(work_dir / "artifacts"), *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def _running_cluster(running: HarnessCluster | RealCluster) -> Iterator[Target]:
    from keruta_prefect.backends.kubernetes import watch

    running.start()
    try:
        yield running
    finally:
        watch.stop_all()  # before the cluster goes: no watch thread outlives its API server
        running.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Target]:
    """The cluster of the Kubernetes tests: the harness on kmock, whose kubelet really runs the agent (see
    tests/harness), or the real cluster the environment names (tests/targets.py)."""
    target = real_target()
    running = HarnessCluster(tmp_path / "cluster") if target is None else RealCluster(target, tmp_path / "cluster")
    with _running_cluster(running) as started:
        yield started


@pytest.fixture
def manual_cluster(tmp_path: Path) -> Iterator[HarnessCluster]:
    """The harness cluster, but the test drives Pod status itself (no processes). Harness only."""
    with _running_cluster(HarnessCluster(tmp_path / "cluster", kubelet="manual")) as running:
        assert isinstance(running, HarnessCluster)
        yield running


def pytest_configure(config: pytest.Config) -> None:
    try:
        target = real_target()
    except (ValueError, OSError) as exc:
        raise pytest.UsageError(f"the real-cluster target: {exc}") from None
    if target is not None and (getattr(config.option, "numprocesses", None) or 0) > 1:
        raise pytest.UsageError("on a real cluster the Kubernetes tests run one at a time (they share its namespace "
                                "and the API port): run pytest with -n 0")


def pytest_report_header(config: pytest.Config) -> str:
    target = real_target()
    if target is None:
        return "keruta Kubernetes target: the harness cluster (tests/harness)"
    return (f"keruta Kubernetes target: the real cluster of {target.kubeconfig}, namespace {target.namespace}; "
            f"keruta API on {target.api_host}:{target.api_port}, for Pods at {target.api_url}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``harness_only("why")`` tests are skipped on a real cluster, with the reason; a test that drives the
    kubelet itself (``manual_cluster``) must say so with the marker."""
    real = real_target() is not None
    for item in items:
        marker = item.get_closest_marker("harness_only")
        if marker is None:
            if "manual_cluster" in getattr(item, "fixturenames", ()):
                raise pytest.UsageError(f"{item.nodeid} drives the harness kubelet (manual_cluster): mark it "
                                        "@pytest.mark.harness_only(\"why\")")
            continue
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
        if not reason:
            raise pytest.UsageError(f"{item.nodeid}: harness_only needs its reason")
        if real:
            item.add_marker(pytest.mark.skip(reason=f"harness only: {reason}"))


@pytest.fixture(autouse=True)
def _quick_watches() -> Iterator[None]:
    """Shorter watch timeouts so restarts happen within a test (the logic is the same)."""
    from keruta_prefect.backends.kubernetes import watch

    saved = dict(watch.DEFAULT_TUNING.__dict__)
    # The harness sends a bookmark every second; a healthy watch is never silent for 4 s.
    watch.DEFAULT_TUNING.__dict__.update(server_timeout=5, read_timeout=4, backoff=0.1, idle_seconds=2)
    yield
    watch.DEFAULT_TUNING.__dict__.update(saved)
