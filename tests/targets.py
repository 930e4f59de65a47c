"""Where the Kubernetes tests run: the harness cluster (the default) or a real cluster.

The same test functions run against either. The ``cluster`` fixture (tests/conftest.py) gives a
:class:`Target`: a :class:`HarnessCluster` (tests/harness, in this process) by default, or a
:class:`RealCluster` (the official client against ``$KUBECONFIG``, nothing else) when the environment
names a real cluster:

    KERUTA_E2E_PROPERTIES  application.properties for that cluster. It selects the real target; what it sets
                           (keruta.kubernetes.default-namespace, default-image, image-pull-policy, git-image…)
                           is the base of every test's settings, the test's own values on top. Its
                           keruta.kubernetes.api-url is the tests' keruta API as agent Pods reach it (e.g.
                           http://172.18.0.1:18080 on kind: the host as the cluster's network sees it).
    KUBECONFIG             the cluster (one file; required with KERUTA_E2E_PROPERTIES).
    KERUTA_E2E_API_HOST    the address the tests' keruta API (and git remote) binds to (default 0.0.0.0).
    KERUTA_E2E_API_PORT    its port (default: the port of keruta.kubernetes.api-url).

The namespace is the tests' own: before and after each test, every Job, Pod and PersistentVolumeClaim in
it is deleted, and so are the Secrets and namespaces the test created. Tests run one at a time there
(``-n 0``): they share the namespace, the API port and the Job names.

Tests that need what only the harness can do (a manual kubelet, injected faults, the API server's
request records) are marked ``@pytest.mark.harness_only("why")`` and skipped on a real cluster with
that reason. A test that checks a harness record beside what a user sees does so under
:func:`harness_of`, which is ``None`` on a real cluster.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Callable, Mapping
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import kubernetes.client
import kubernetes.config
from keruta_harness.cluster import Cluster
from keruta_harness.containers import bare_repository
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict, FilePath

from keruta_prefect.settings import KerutaSettings
from keruta_prefect.settings.properties import load_properties_file, parse_properties
from tests.waiting import eventually

PROPERTIES_ENV = "KERUTA_E2E_PROPERTIES"


class RealTarget(BaseModel):
    """The environment contract of a real cluster, validated once (see the module's docstring)."""

    model_config = ConfigDict(frozen=True)

    kubeconfig: FilePath
    properties: FilePath
    settings: KerutaSettings
    api_host: str = "0.0.0.0"
    api_port: int

    @property
    def namespace(self) -> str:
        return self.settings.default_namespace

    @property
    def api_url(self) -> str:
        return self.settings.api_url


def real_target_from(env: Mapping[str, str]) -> RealTarget | None:
    """The real cluster ``env`` names, or None for the harness. Raises ValueError on half a contract."""
    properties = env.get(PROPERTIES_ENV)
    if not properties:
        return None
    kubeconfig = env.get("KUBECONFIG")
    if not kubeconfig or os.pathsep in kubeconfig:
        raise ValueError(f"{PROPERTIES_ENV} selects a real cluster: set KUBECONFIG to its kubeconfig (one file)")
    settings = load_properties_file(properties)
    port = env.get("KERUTA_E2E_API_PORT") or urlsplit(settings.api_url).port
    if port is None:
        raise ValueError(f"keruta.kubernetes.api-url in {properties} names no port: set it, or KERUTA_E2E_API_PORT")
    return RealTarget(kubeconfig=Path(kubeconfig), properties=Path(properties), settings=settings,
                      api_host=env.get("KERUTA_E2E_API_HOST") or "0.0.0.0", api_port=int(port))


@cache
def real_target() -> RealTarget | None:
    return real_target_from(os.environ)


class Target(Protocol):
    """What the shared Kubernetes tests use of a cluster: read and set up through the Kubernetes API only."""

    root: Path  # a local directory for the test's files

    @property
    def url(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    def kubeconfig(self) -> Path: ...
    def settings(self, **values: Any) -> KerutaSettings: ...
    def properties(self, **extra: str) -> dict[str, str]: ...
    def api_binding(self) -> dict[str, Any]: ...
    def pods(self, namespace: str | None = None, job: str | None = None) -> list[dict[str, Any]]: ...
    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]: ...
    def job(self, name: str, namespace: str | None = None) -> dict[str, Any] | None: ...
    def pvcs(self, namespace: str | None = None) -> list[dict[str, Any]]: ...
    def create_secret(self, name: str, data: dict[str, str], namespace: str | None = None) -> None: ...
    def create_namespace(self, name: str) -> None: ...
    def create_job(self, job: dict[str, Any]) -> None: ...
    def delete_job(self, name: str, namespace: str | None = None) -> None: ...
    def git_remote(self, name: str, files: dict[str, str]) -> str: ...
    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any: ...
    def wait_for_pod(self, job: str, namespace: str | None = None, running: bool = False) -> dict[str, Any]: ...


def harness_of(cluster: Target) -> HarnessCluster | None:
    """The harness behind ``cluster``, for checks of what only it records (requests, execs); None on a real one."""
    return cluster if isinstance(cluster, HarnessCluster) else None


def job_complete(job: dict[str, Any] | None) -> bool:
    return any(c.get("type") == "Complete" and c.get("status", "True") == "True"
               for c in ((job or {}).get("status") or {}).get("conditions") or [])


class HarnessCluster(Cluster):
    """The harness cluster, with the few setup words of :class:`Target` it does not have itself."""

    namespace = "default"

    def settings(self, **values: Any) -> KerutaSettings:
        return KerutaSettings(**{"config_path": str(self.kubeconfig()), **values})

    def properties(self, **extra: str) -> dict[str, str]:
        return {"keruta.kubernetes.config-path": str(self.kubeconfig()), **extra}

    def api_binding(self) -> dict[str, Any]:
        return {}  # loopback, a free port: the harness kubelet runs Pods on this machine

    def pvcs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        from keruta_harness.cluster import PVCS

        return self.store.items(PVCS, namespace or self.namespace)

    def create_job(self, job: dict[str, Any]) -> None:
        from keruta_harness.cluster import JOBS

        self.call(self.put(JOBS, job))

    def git_remote(self, name: str, files: dict[str, str]) -> str:
        url = f"https://git.example.com/{name}.git"
        self.add_git_remote(url, files)
        return url


class GitServer:
    """Bare repositories over git's smart HTTP (``git http-backend`` as a CGI), for Pods to clone."""

    def __init__(self, root: Path, host: str, public_host: str) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        served = self

        class Handler(BaseHTTPRequestHandler):
            def _cgi(self) -> None:
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(served.root),
                       "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
                       "REQUEST_METHOD": self.command, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                       "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": self.client_address[0]}
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60)
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                headers = [line.split(":", 1) for line in head.decode("latin-1").split("\r\n") if ":" in line]
                status = next((v.strip() for k, v in headers if k.lower() == "status"), "200 OK")
                self.send_response(int(status.split()[0]))
                for key, value in headers:
                    if key.lower() != "status":
                        self.send_header(key, value.strip())
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _cgi

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.public = f"http://{public_host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="keruta-test-git", daemon=True).start()

    def add(self, name: str, files: dict[str, str]) -> str:
        bare_repository(self.root / f"{name}.git", files)
        return f"{self.public}/{name}.git"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RealCluster:
    """A real cluster through the official client, in the namespace of :class:`RealTarget`."""

    def __init__(self, target: RealTarget, root: Path) -> None:
        self.target = target
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.client = kubernetes.config.new_client_from_config(config_file=str(target.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.secrets: set[tuple[str, str]] = {(target.namespace, target.settings.token_secret_name)}
        self.namespaces: set[str] = set()  # other namespaces the test used (cleaned like the main one)
        self.created: set[str] = set()  # …and those it created (deleted after the test)
        self.git: GitServer | None = None

    @property
    def url(self) -> str:
        return str(self.client.configuration.host)

    @property
    def namespace(self) -> str:
        return self.target.namespace

    def _dict(self, obj: Any) -> Any:
        return self.client.sanitize_for_serialization(obj)

    # --- life cycle ----------------------------------------------------------------------------------
    def start(self) -> RealCluster:
        self.clean()
        return self

    def stop(self) -> None:
        try:
            self.clean()
            for name in self.created:
                self._ignore_missing(self.core.delete_namespace, name)
        finally:
            if self.git is not None:
                self.git.stop()
            self.client.close()

    def clean(self) -> None:
        """Delete every Job, Pod and PVC in the namespaces of the tests, and the Secrets tests create; wait."""
        now = kubernetes.client.V1DeleteOptions(grace_period_seconds=0, propagation_policy="Background")
        namespaces = [self.namespace, *sorted(self.namespaces)]
        for namespace in namespaces:
            for job in self.jobs(namespace):
                self._ignore_missing(self.batch.delete_namespaced_job, job["metadata"]["name"], namespace, body=now)
            for pod in self.pods(namespace):
                if "job-name" in (pod["metadata"].get("labels") or {}):
                    self._ignore_missing(self.core.delete_namespaced_pod, pod["metadata"]["name"], namespace,
                                         body=now)
            for claim in self.pvcs(namespace):
                self._ignore_missing(self.core.delete_namespaced_persistent_volume_claim, claim["metadata"]["name"],
                                     namespace)
        for namespace, name in sorted(self.secrets):
            self._ignore_missing(self.core.delete_namespaced_secret, name, namespace)

        def gone() -> bool:
            return not any(self.jobs(ns) or self.pvcs(ns) or [p for p in self.pods(ns)
                                                              if "job-name" in (p["metadata"].get("labels") or {})]
                           for ns in namespaces if self._exists(ns))
        self.wait_for(gone, timeout=120, what=f"the Jobs, Pods and PVCs of the tests in {namespaces} to be gone")

    @staticmethod
    def _ignore_missing(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _exists(self, namespace: str) -> bool:
        try:
            self.core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- what the tests read ---------------------------------------------------------------------------
    def kubeconfig(self) -> Path:
        return self.target.kubeconfig

    def settings(self, **values: Any) -> KerutaSettings:
        base = self.target.settings
        fields = {name: getattr(base, name) for name in base.model_fields_set if name != "config_path"}
        return KerutaSettings(**{**fields, "config_path": str(self.kubeconfig()), **values})

    def properties(self, **extra: str) -> dict[str, str]:
        given = parse_properties(self.target.properties.read_bytes(), source=str(self.target.properties))
        return {**given, "keruta.kubernetes.config-path": str(self.kubeconfig()), **extra}

    def api_binding(self) -> dict[str, Any]:
        return {"host": self.target.api_host, "port": self.target.api_port, "public_url": self.target.api_url}

    def pods(self, namespace: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        selector = f"job-name={job}" if job else None
        answer = self.core.list_namespaced_pod(namespace or self.namespace, label_selector=selector)
        return list(self._dict(answer)["items"])

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return list(self._dict(self.batch.list_namespaced_job(namespace or self.namespace))["items"])

    def job(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return dict(self._dict(self.batch.read_namespaced_job(name, namespace or self.namespace)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pvcs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        answer = self.core.list_namespaced_persistent_volume_claim(namespace or self.namespace)
        return list(self._dict(answer)["items"])

    # --- what the tests set up -------------------------------------------------------------------------
    def create_secret(self, name: str, data: dict[str, str], namespace: str | None = None) -> None:
        namespace = namespace or self.namespace
        self._ignore_missing(self.core.delete_namespaced_secret, name, namespace)
        self.secrets.add((namespace, name))
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.core.create_namespaced_secret(namespace, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                                       "metadata": {"name": name}, "data": encoded})

    def create_namespace(self, name: str) -> None:
        """Create it (after a namespace of that name has finished terminating); deleted after the test."""
        def settled() -> str | None:
            try:
                phase = self.core.read_namespace(name).status.phase
            except ApiException as exc:
                if exc.status == 404:
                    return "absent"
                raise
            return None if phase == "Terminating" else "present"

        if self.wait_for(settled, timeout=120, what=f"namespace {name} to finish terminating") == "absent":
            self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            self.created.add(name)
        self.namespaces.add(name)

    def create_job(self, job: dict[str, Any]) -> None:
        self.batch.create_namespaced_job(job["metadata"].get("namespace") or self.namespace, job)

    def delete_job(self, name: str, namespace: str | None = None) -> None:
        """Someone else deletes the Job (background propagation)."""
        self.batch.delete_namespaced_job(name, namespace or self.namespace,
                                         body=kubernetes.client.V1DeleteOptions(propagation_policy="Background"))

    def git_remote(self, name: str, files: dict[str, str]) -> str:
        if self.git is None:
            public = urlsplit(self.target.api_url).hostname or "127.0.0.1"
            self.git = GitServer(self.root / "git", self.target.api_host, public)
        return self.git.add(name, files)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
        return eventually(predicate, what=what, timeout=timeout)

    def wait_for_pod(self, job: str, namespace: str | None = None, running: bool = False) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for pod in self.pods(namespace, job):
                if not running or (pod.get("status") or {}).get("phase") == "Running":
                    return pod
            return None
        return self.wait_for(found, what=f"a pod of job {job}")

