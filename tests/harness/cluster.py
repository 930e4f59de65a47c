"""A realistic Kubernetes cluster for tests: kmock's emulator plus what a real API server, the Job
controller and a kubelet do.

kmock (`kmock.KubernetesEmulator` on loopback) stores the objects and answers create/get/patch/delete.
This harness wraps it once, so that every test gets the same realistic behaviour. ``Cluster`` is the one
thing tests use; it composes the roles, one module each:

- store.py: resourceVersions on every object and list, a history of changes, compaction and 410 Gone;
- apiserver.py: REST, RBAC (403s from a policy the test sets) and SelfSubjectAccessReviews, create with the
  API server's defaults and validation (kubernetes-validate for every supported Kubernetes version; an
  invalid Job or PVC is refused with 422, undecodable quantities with 400), deletion with propagation;
- watch.py: list and watch with label and field selectors (also `watch=True`, as kubernetes_asyncio sends
  it), `timeoutSeconds`, bookmarks;
- controller.py: the Job controller: Pods with the standard labels and owner references, Job conditions as
  Kubernetes ≥ 1.31 sets them (SuccessCriteriaMet/FailureTarget before Complete/Failed), podFailurePolicy,
  backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, Foreground deletion;
- kubelet.py, containers.py: a kubelet that really runs each Pod's containers as local processes (`$(VAR)`
  expansion, env from Secrets, volumes mapped to directories, so keruta-agent talks to a real keruta API),
  with image pull failures, missing Secrets, unschedulable Pods, OOM kills and evictions on demand; or
  `manual` mode, where the test drives Pod status itself;
- logs.py: `pods/log` served as text (follow, timestamps, sinceTime with the API's one-second precision);
- exec.py, spdy.py: `pods/exec` over a WebSocket (v5/v4) or SPDY/3.1 in the Kubernetes channel protocol, stdin included;
- discovery.py, tables.py, protobuf.py: what kubectl needs (discovery, OpenAPI, Tables, protobuf bodies; README.md);
- faults.py: 5xx bursts, RBAC denials, dropped, silent or expired watches, log streams cut mid-line,
  stalled or broken execs;
- validate.py: the harness' own image, quantity and schema checks (nothing here imports the project).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import kmock

from .apiserver import ApiServer, Emulator
from .common import JOBS, NAMESPACES, PODS, PVCS, RESOURCES, SECRETS, Call, Stream, namespace_object, now_iso
from .controller import JobController
from .exec import Exec
from .faults import Fault, Faults
from .kubelet import Kubelet, set_container
from .logs import Logs
from .store import Store

__all__ = ["JOBS", "NAMESPACES", "PODS", "PVCS", "SECRETS", "Call", "Cluster"]


class Cluster:
    """Start with ``Cluster(tmp_path).start()``; ``kubeconfig()`` gives a file for the official client.
    Every method may be called from a test's thread; the cluster runs on a loop thread of its own."""

    def __init__(self, root: Path, *, kubelet: str = "run", validate: bool = True) -> None:
        self.root = root
        self.store = Store()
        self.injector = Faults(self.store)
        self.logs = Logs(self.store, self.injector)
        self.kubelet = Kubelet(self.store, self.logs, root, kubelet)
        self.controller = JobController(self.store, self.kubelet)
        self.exec = Exec(self.store, self.kubelet, self.injector)
        self.api = ApiServer(self.store, self.injector, self.controller, self.kubelet,
                             {"log": self.logs.serve, "exec": self.exec.serve}, root=root, validate=validate)
        self.server: kmock.Server | None = None
        self.url = ""

    # --- life cycle ----------------------------------------------------------------------------------
    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.store.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        emulator = Emulator(api=self.api)
        for resource in RESOURCES:
            emulator.resources[resource] = {}
        self.store.emulator = emulator
        await emulator.__aenter__()
        self.server = kmock.Server(emulator)
        await self.server.__aenter__()
        self.url = str(self.server.url).rstrip("/")
        for namespace in sorted(self.api.namespaces):
            await self.put(NAMESPACES, namespace_object(namespace))

    def stop(self) -> None:
        async def _stop() -> None:
            self.kubelet.kill_all()
            for task in list(self.store.tasks):
                task.cancel()
            self.injector.drop_all()
            await self.store.notify()
            self.logs.wake_all()
            await asyncio.sleep(0.05)
            assert self.server is not None and self.store.emulator is not None
            await self.server.__aexit__(None, None, None)
            try:
                await self.store.emulator.__aexit__(None, None, None)
            except BaseException:
                pass

        try:
            self.call(_stop(), timeout=20)
        finally:
            self.store.loop.call_soon_threadsafe(self.store.loop.stop)
            self.store.thread.join(5)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the cluster's loop from a test thread and return its result."""
        return self.store.call(coro, timeout)

    def kubeconfig(self, path: Path | None = None, namespace: str = "default") -> Path:
        path = path or self.root / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "harness",
            "clusters": [{"name": "harness", "cluster": {"server": self.url}}],
            "users": [{"name": "keruta", "user": {"token": "harness-token"}}],
            "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": "keruta",
                                                        "namespace": namespace}}],
        }))
        return path

    # --- what the roles record, for assertions -------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        return self.api.calls

    def calls_of(self, verb: str | None = None, resource: str | None = None) -> list[Call]:
        return [c for c in self.calls
                if (verb is None or c.verb == verb) and (resource is None or c.resource == resource)]

    @property
    def validation_errors(self) -> list[str]:
        return self.api.validation_errors

    @property
    def exec_commands(self) -> list[list[str]]:
        return self.exec.commands

    @property
    def peak_watches(self) -> int:
        return self.injector.peak_watches

    @property
    def faults(self) -> list[Fault]:
        return self.injector.faults

    @property
    def unpullable(self) -> set[str]:
        return self.kubelet.unpullable

    @property
    def log_drop_after(self) -> int | None:
        return self.injector.log_drop_after

    @log_drop_after.setter
    def log_drop_after(self, lines: int | None) -> None:
        """Cut the next log stream after ``lines`` lines (in the middle of the next one)."""
        self.injector.log_drop_after = lines

    # --- the store -----------------------------------------------------------------------------------
    async def put(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.store.put(resource, obj)

    def pods(self, namespace: str = "default", job: str | None = None) -> list[dict[str, Any]]:
        if job is None:
            return self.store.items(PODS, namespace)
        return self.store.labelled(PODS, namespace, "job-name", job)

    def jobs(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.store.items(JOBS, namespace)

    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.store.get(JOBS, namespace, name)

    def create_secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.call(self.put(SECRETS, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                     "metadata": {"name": name, "namespace": namespace}, "data": encoded}))

    def create_namespace(self, name: str) -> None:
        self.call(self.put(NAMESPACES, namespace_object(name)))

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_for_pod(self, job: str, namespace: str = "default", running: bool = False,
                     timeout: float = 20) -> dict[str, Any]:
        """The first Pod of Job ``job`` (``running``: in phase Running); nothing polls (a thousand threads
        may wait so at once)."""
        def found(pod: dict[str, Any]) -> bool:
            return not running or (pod.get("status") or {}).get("phase") == "Running"
        pod = self.store.first_labelled(PODS, namespace, "job-name", job, found, timeout)
        if pod is None:
            raise AssertionError(f"timed out waiting for a pod of job {job}")
        return pod

    # --- the kubelet, driven by the test (manual mode) and node faults --------------------------------
    def run_pod(self, pod: str, namespace: str = "default") -> None:
        """Manual kubelet: the main container is running."""
        self.call(set_container(self.store, namespace, pod, "main", {"running": {"startedAt": now_iso()}},
                                phase="Running", ready=True))

    def finish_pod(self, pod: str, exit_code: int = 0, namespace: str = "default", reason: str | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        """Manual kubelet: the main container ends with ``exit_code``."""
        state = {"terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                                "startedAt": now_iso(), "finishedAt": now_iso()}}
        self.logs.finish(namespace, pod, "main")
        self.call(set_container(self.store, namespace, pod, "main", state,
                                phase="Succeeded" if exit_code == 0 else "Failed", extra=extra))

    def wait_container(self, pod: str, reason: str, message: str = "", namespace: str = "default",
                       container: str = "main", init: bool = False) -> None:
        self.call(set_container(self.store, namespace, pod, container,
                                {"waiting": {"reason": reason, "message": message}}, init=init))

    def log(self, pod: str, *lines: str, namespace: str = "default", container: str = "main") -> None:
        async def _append() -> None:
            for line in lines:
                await self.logs.append(namespace, pod, container, line)
        self.call(_append())

    def end_log(self, pod: str, namespace: str = "default", container: str = "main") -> None:
        self.logs.finish(namespace, pod, container)
        self.call(self.store.notify())

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Graceful deletion, as the kubelet does it (a coroutine: run it with ``call``)."""
        await self.kubelet.delete_pod(namespace, name)

    def delete_job(self, name: str, namespace: str = "default") -> None:
        """Someone else deletes the Job (background propagation)."""
        self.call(self.controller.delete_job(namespace, name))

    def oom_kill(self, pod: str, namespace: str = "default") -> None:
        self.kubelet.oom_kill(namespace, pod)

    def evict(self, pod: str, namespace: str = "default") -> None:
        self.call(self.kubelet.evict(namespace, pod))

    def stick_pod(self, pod: str, namespace: str = "default") -> None:
        """A finalizer nobody removes: deleting the Pod marks it, and it stays."""
        self.kubelet.stuck_pods.add((namespace, pod))

    def unstick_pod(self, pod: str, namespace: str = "default") -> None:
        self.kubelet.stuck_pods.discard((namespace, pod))
        self.call(self.store.remove(PODS, namespace, pod))

    def add_git_remote(self, url: str, files: dict[str, str]) -> Path:
        """A repository the clone init container can fetch `url` from (mapped with git's insteadOf)."""
        return self.kubelet.add_git_remote(url, files)

    # --- API faults ----------------------------------------------------------------------------------
    def fail(self, count: int, status: int = 500, verb: str | None = None, resource: str | None = None) -> None:
        """The next ``count`` matching requests get ``status``."""
        self.injector.fail(count, status, verb, resource)

    def deny(self, resource: str, verb: str, subresource: str | None = None, namespace: str | None = None) -> None:
        """RBAC refuses the verb (in one namespace, or everywhere)."""
        self.injector.deny(resource, verb, subresource, namespace)

    def stall_exec(self, count: int = 1) -> None:
        """The next ``count`` execs are upgraded (WebSocket or SPDY) and then send nothing at all."""
        self.injector.stall_exec(count)

    def break_exec(self, after_bytes: int) -> None:
        """The next exec's connection breaks after ``after_bytes`` bytes of stdout (no status, no close)."""
        self.injector.break_exec(after_bytes)

    def watches(self) -> list[Stream]:
        return self.injector.watches()

    def inject_watch_lines(self, *lines: bytes) -> None:
        """Raw lines into every open watch stream, before its next event (e.g. b"\\n", a blank line)."""
        self.injector.inject_watch_lines(*lines)

    def expire_watches(self) -> None:
        """Compact the history (old resourceVersions now get 410) and send 410 to open watches."""
        self.injector.expire_watches()

    def drop_watches(self) -> None:
        self.injector.drop_watches()

    def silence_watches(self) -> None:
        self.injector.silence_watches()
