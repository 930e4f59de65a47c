"""A realistic Kubernetes cluster for tests: kmock's emulator plus what a real API server, the Job
controller and a kubelet do.

kmock (`kmock.KubernetesEmulator` on loopback) stores the objects and answers create/get/patch/delete.
This harness wraps it once, so that every test gets the same realistic behaviour:

- resourceVersions on every object and list, a history of changes, compaction and 410 Gone;
- list and watch with label and field selectors (also `watch=True`, as kubernetes_asyncio sends it),
  `timeoutSeconds`, bookmarks;
- a Job controller: Pods with the standard labels and owner references, Job conditions as
  Kubernetes ≥ 1.31 sets them (SuccessCriteriaMet/FailureTarget before Complete/Failed),
  podFailurePolicy, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, Foreground deletion;
- a kubelet that really runs each Pod's containers as local processes (`$(VAR)` expansion, env from
  Secrets, volumes mapped to directories, so keruta-agent talks to a real keruta API), with image pull
  failures, missing Secrets, unschedulable Pods, OOM kills and evictions on demand; or `manual` mode,
  where the test drives Pod status itself;
- `pods/log` served as text (follow, timestamps, sinceTime with the API's one-second precision);
- SelfSubjectAccessReview answers and RBAC denials (403) from a policy the test sets;
- faults: 5xx bursts, dropped, silent or expired watches, log streams cut mid-line.

Every Job and PVC created through the API is validated with kubernetes-validate for every supported
Kubernetes version (an invalid one is refused with 422, as a real API server would).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import random
import re
import shutil
import signal
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes_validate

from tests.harness.selectors import field_matcher, label_matcher
from tests.k8s_validate import versions

PODS = kmock.resource("", "v1", "pods")
JOBS = kmock.resource("batch", "v1", "jobs")
PVCS = kmock.resource("", "v1", "persistentvolumeclaims")
SECRETS = kmock.resource("", "v1", "secrets")
NAMESPACES = kmock.resource("", "v1", "namespaces")
KINDS = {"pods": "Pod", "jobs": "Job", "persistentvolumeclaims": "PersistentVolumeClaim", "secrets": "Secret",
         "namespaces": "Namespace"}
VALIDATED = {"jobs", "persistentvolumeclaims"}
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_timestamp() -> str:
    ns = time.time_ns()
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


@dataclass(frozen=True)
class Call:
    """One API request, as RBAC sees it."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    at: float = field(default_factory=time.perf_counter)  # when the API server received it


@dataclass
class Event:
    rv: int
    type: str
    resource: str
    namespace: str | None
    obj: dict[str, Any]


@dataclass
class Fault:
    count: int
    status: int
    verb: str | None
    resource: str | None


@dataclass
class ContainerLog:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, text)
    finished: bool = False


@dataclass
class Stream:
    """An open watch or log stream, so faults can reach it."""

    kind: str
    drop: bool = False
    expire: bool = False
    silent: bool = False
    inject: list[bytes] = field(default_factory=list)  # raw lines to send as they are (watch faults)


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def error(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response(status_body(code, reason, message), status=code)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    cluster: Any = None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        return await self.cluster._handle(request, super()._handle)


class Cluster:
    """Start with ``Cluster(tmp_path).start()``; ``kubeconfig()`` gives a file for the official client."""

    def __init__(self, root: Path, *, kubelet: str = "run", validate: bool = True) -> None:
        self.root = root
        self.kubelet_mode = kubelet
        self.validate = validate
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="harness-cluster", daemon=True)
        self.emulator: Emulator | None = None
        self.server: kmock.Server | None = None
        self.url = ""
        # API server state
        self.rv = 0
        self.history: list[Event] = []
        self.compacted_rv = 0
        self.changed: asyncio.Condition | None = None
        self.streams: list[Stream] = []
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.denied: set[tuple[str, str | None, str]] = set()  # (resource, subresource, verb)
        self.namespaces: set[str] = {"default"}
        self.bookmark_interval = 1.0
        self.log_drop_after: int | None = None  # cut the next log stream after N lines (mid-line)
        # nodes and kubelet
        self.node_cpu = 4.0
        self.node_memory = 16 * 2**30
        self.unpullable: set[str] = set()
        self.git_remotes: dict[str, Path] = {}
        self.grace_seconds = 2.0
        self.logs: dict[tuple[str, str, str], ContainerLog] = {}
        self.processes: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self.oom: set[tuple[str, str]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.finished_pods: set[tuple[str | None, str]] = set()
        self.peak_watches = 0  # most watch streams open at the same time
        self.exec_commands: list[list[str]] = []
        self.exec_faults: list[tuple[str, int]] = []  # ("stall", 0) or ("break", after_bytes), one per exec
        self.denied_in: set[tuple[str, str | None, str, str]] = set()  # (resource, subresource, verb, namespace)
        self.stuck_pods: set[tuple[str, str]] = set()  # (namespace, pod): a finalizer keeps them after deletion
        self.validation_errors: list[str] = []

    # --- life cycle ----------------------------------------------------------------------------------
    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.changed = asyncio.Condition()
        self.emulator = Emulator(cluster=self)
        for resource in (PODS, JOBS, PVCS, SECRETS, NAMESPACES):
            self.emulator.resources[resource] = {}
        await self.emulator.__aenter__()
        self.server = kmock.Server(self.emulator)
        await self.server.__aenter__()
        self.url = str(self.server.url).rstrip("/")
        for namespace in sorted(self.namespaces):
            await self.put(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})

    def stop(self) -> None:
        async def _stop() -> None:
            for key, proc in list(self.processes.items()):
                self._signal(proc, signal.SIGKILL)
                self.processes.pop(key, None)
            for task in list(self.tasks):
                task.cancel()
            for stream in self.streams:
                stream.drop = True
            async with self._cond():
                self._cond().notify_all()
            await asyncio.sleep(0.05)
            assert self.server is not None and self.emulator is not None
            await self.server.__aexit__(None, None, None)
            try:
                await self.emulator.__aexit__(None, None, None)
            except BaseException:
                pass

        try:
            self.call(_stop(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the cluster's loop from a test thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

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

    def _cond(self) -> asyncio.Condition:
        assert self.changed is not None
        return self.changed

    async def _wait_change(self, timeout: float, ready: Callable[[], bool] | None = None) -> None:
        """Until the store or a log changes, or ``timeout`` seconds. ``ready`` is checked under the lock
        first: a change made while the caller was busy (e.g. writing a response) is not missed."""
        async with self._cond():
            if ready is not None and ready():
                return
            try:
                await asyncio.wait_for(self._cond().wait(), timeout)
            except TimeoutError:
                pass

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- object store: every write gets a resourceVersion and a history entry ------------------------
    def _objects(self) -> Any:
        assert self.emulator is not None
        return self.emulator.objects

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a read of the store on the cluster's loop (the only thread that changes it)."""
        if threading.current_thread() is self.thread:
            return fn(*args)

        async def read() -> Any:
            return fn(*args)
        return self.call(read())

    def get(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        if threading.current_thread() is not self.thread:
            return self._on_loop(self.get, resource, namespace, name)
        key = (resource, namespace, name)
        obj = self._objects()[key] if key in self._objects() else None  # noqa: SIM401 (no .get on kmock's array)
        if obj is None or obj.deleted:
            return None
        return copy.deepcopy(obj.raw)

    def items(self, resource: kmock.resource, namespace: str | None = None) -> list[dict[str, Any]]:
        if threading.current_thread() is not self.thread:
            return self._on_loop(self.items, resource, namespace)
        out = []
        for (res, ns, _name), obj in self._objects().items():
            if res == resource and not obj.deleted and (namespace is None or ns == namespace):
                out.append(copy.deepcopy(obj.raw))
        return out

    async def _commit(self, resource: kmock.resource, namespace: str | None, name: str, kind: str) -> None:
        self.rv += 1
        key = (resource, namespace, name)
        obj = self._objects()[key]
        if kind == "DELETED":
            snapshot = copy.deepcopy(obj.history[-2].raw if len(obj.history) > 1 and obj.history[-2] else {})
            snapshot.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        else:
            obj.patch({"metadata": {"resourceVersion": str(self.rv)}})
            snapshot = copy.deepcopy(obj.raw)
        self.history.append(Event(self.rv, kind, resource.plural or "", namespace, snapshot))
        async with self._cond():
            self._cond().notify_all()
        if kind != "DELETED":
            self._react(resource, snapshot, kind)
        else:
            self._react_deleted(resource, snapshot)

    async def put(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_iso())
        key = (resource, meta.get("namespace"), meta["name"])
        objects = self._objects()
        if key in objects and objects[key].deleted:
            objects[key].create(obj)
        else:
            objects[key] = obj
        await self._commit(resource, meta.get("namespace"), meta["name"], "ADDED")
        return self.get(resource, meta.get("namespace"), meta["name"]) or {}

    async def patch(self, resource: kmock.resource, namespace: str | None, name: str,
                    changes: dict[str, Any]) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self._objects() or self._objects()[key].deleted:
            return None
        self._objects()[key].patch(changes)
        await self._commit(resource, namespace, name, "MODIFIED")
        return self.get(resource, namespace, name)

    async def remove(self, resource: kmock.resource, namespace: str | None, name: str) -> None:
        key = (resource, namespace, name)
        if key in self._objects() and not self._objects()[key].deleted:
            self._objects()[key].delete()
            await self._commit(resource, namespace, name, "DELETED")

    # --- the API server ------------------------------------------------------------------------------
    async def _handle(self, request: kmock.Request, fallback: Callable[[Any], Any]) -> aiohttp.web.StreamResponse:
        resource = request.resource
        params = dict(request.params)
        is_watch = params.get("watch", "").lower() in ("true", "1")
        method = str(getattr(request.method, "value", request.method)).upper()
        if request.url.path in ("/version", "/version/"):  # the official client asks for /version/
            return aiohttp.web.json_response({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-harness", "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
                "compiler": "gc", "platform": "linux/amd64"})
        if resource is None:
            return await fallback(request)
        if method == "GET" and re.fullmatch(r"/api/v1/namespaces/[^/]+", request.url.path):
            # kmock reads /api/v1/namespaces/NAME as a list in namespace NAME: it is a get of a Namespace.
            self.calls.append(Call("get", "", "namespaces", None, None, request.namespace))
            found = self.get(NAMESPACES, None, request.namespace)
            if found is None:
                return error(404, "NotFound", f'namespaces "{request.namespace}" not found')
            return aiohttp.web.json_response(found)
        verb = VERBS.get(method, method.lower())
        if method == "GET" and request.name is None:
            verb = "watch" if is_watch else "list"
        if request.subresource == "exec":
            verb = "create"  # WebSocket exec is authorized as `create` on pods/exec
        name = request.name
        if verb == "create" and request.subresource is None and isinstance(request.data, dict):
            name = request.data.get("metadata", {}).get("name")
        call = Call(verb, resource.group or "", resource.plural or "", request.subresource, request.namespace, name)
        self.calls.append(call)

        if (call.resource, call.subresource, verb) in self.denied or \
                (call.resource, call.subresource, verb, request.namespace or "") in self.denied_in:
            sub = f"/{call.subresource}" if call.subresource else ""
            group = f' in API group "{call.group}"' if call.group else ' in API group ""'
            return error(403, "Forbidden", f'{call.resource}{sub}{"." + call.group if call.group else ""} '
                         f'"{name or ""}" is forbidden: User "system:serviceaccount:keruta:keruta" cannot {verb} '
                         f'resource "{call.resource}{sub}"{group} in the namespace "{request.namespace}"')
        for fault in self.faults:
            if fault.count > 0 and (fault.verb in (None, verb)) and (fault.resource in (None, call.resource)):
                fault.count -= 1
                return error(fault.status, "InternalError", f"injected fault {fault.status}")

        plural = resource.plural or ""
        if plural == "selfsubjectaccessreviews":
            return self._access_review(request)
        if request.namespace and request.namespace not in self.namespaces and plural != "namespaces":
            return error(404, "NotFound", f'namespaces "{request.namespace}" not found')
        if request.subresource == "log":
            return await self._serve_log(request)
        if request.subresource == "exec":
            return await self._serve_exec(request)
        if is_watch:
            return await self._serve_watch(request)
        if verb == "list":
            return self._serve_list(request)
        if verb == "create" and request.subresource is None:
            return await self._create(request, fallback)
        if verb == "delete" and name is not None:
            return await self._delete(request)
        if verb in ("patch", "update"):
            response = await fallback(request)
            if response.status < 300:
                await self._commit(resource, request.namespace, name or "", "MODIFIED")
                body = self.get(resource, request.namespace, name or "")
                return aiohttp.web.json_response(body)
            return response
        return await fallback(request)

    def _access_review(self, request: kmock.Request) -> aiohttp.web.Response:
        review = copy.deepcopy(request.data or {})
        attrs_ = (review.get("spec") or {}).get("resourceAttributes") or {}
        key = (attrs_.get("resource", ""), attrs_.get("subresource") or None, attrs_.get("verb", ""))
        allowed = key not in self.denied
        review["status"] = {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it"})}
        return aiohttp.web.json_response(review, status=201)

    async def _create(self, request: kmock.Request, fallback: Callable[[Any], Any]) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        obj = request.data
        if not isinstance(obj, dict):
            return error(400, "BadRequest", "the body of the request was in an unknown format")
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", request.namespace)
        plural = request.resource.plural or ""
        dry_run = request.params.get("dryRun") == "All"
        if self.validate and plural in VALIDATED:
            for version in versions():
                try:  # off the loop: validation takes ~30 ms a version, and watches must keep flowing
                    await asyncio.to_thread(kubernetes_validate.validate, obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    message = f"{KINDS[plural]}.{request.resource.group or 'core'} \"{meta.get('name')}\" is " \
                              f"invalid for Kubernetes {version}: {exc.message}"
                    self.validation_errors.append(message)
                    return error(422, "Invalid", message)
        if self.get(request.resource, request.namespace, meta.get("name", "")) is not None:
            return error(409, "AlreadyExists",
                         f'{plural}{"." + request.resource.group if request.resource.group else ""} '
                         f'"{meta.get("name")}" already exists')
        if dry_run:
            return aiohttp.web.json_response(obj, status=201)
        if plural == "jobs":
            obj.setdefault("status", {})
            # The API server's Job defaults: a selector on the Job's uid, and its labels on the Pod template.
            uid = meta.setdefault("uid", str(uuid.uuid4()))
            spec = obj.setdefault("spec", {})
            if not spec.get("manualSelector"):
                spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
                template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
                template_meta["labels"] = {**(template_meta.get("labels") or {}),
                                           "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                                           "batch.kubernetes.io/job-name": meta.get("name", ""),
                                           "job-name": meta.get("name", "")}
        created = await self.put(request.resource, obj)
        return aiohttp.web.json_response(created, status=201)

    async def _delete(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        name = request.name or ""
        current = self.get(request.resource, request.namespace, name)
        if current is None:
            plural = request.resource.plural
            group = f".{request.resource.group}" if request.resource.group else ""
            return error(404, "NotFound", f'{plural}{group} "{name}" not found')
        body = request.data if isinstance(request.data, dict) else {}
        policy = body.get("propagationPolicy") or request.params.get("propagationPolicy") or "Background"
        if request.resource.plural == "jobs":
            if policy == "Foreground":
                await self.patch(JOBS, request.namespace, name, {"metadata": {
                    "deletionTimestamp": now_iso(), "finalizers": ["foregroundDeletion"]}})
                self._spawn(self._foreground_delete_job(request.namespace or "", name))
                return aiohttp.web.json_response(self.get(JOBS, request.namespace, name), status=200)
            await self.remove(JOBS, request.namespace, name)
            if policy != "Orphan":
                for pod in self._job_pods(request.namespace or "", name):
                    self._spawn(self.delete_pod(request.namespace or "", pod["metadata"]["name"]))
            return aiohttp.web.json_response(current, status=200)
        if request.resource.plural == "pods":
            self._spawn(self.delete_pod(request.namespace or "", name))
            return aiohttp.web.json_response(current, status=200)
        if request.resource.plural == "persistentvolumeclaims":  # the volume's files go with it
            shutil.rmtree(self.root / "pvcs" / (request.namespace or "") / name, ignore_errors=True)
        await self.remove(request.resource, request.namespace, name)
        return aiohttp.web.json_response(current, status=200)

    async def _foreground_delete_job(self, namespace: str, name: str) -> None:
        pods = self._job_pods(namespace, name)
        await asyncio.gather(*(self.delete_pod(namespace, p["metadata"]["name"]) for p in pods))
        await self.remove(JOBS, namespace, name)

    def _matches(self, request: kmock.Request) -> Callable[[str, str | None, dict[str, Any]], bool]:
        labels = label_matcher(request.params.get("labelSelector"))
        fields = field_matcher(request.params.get("fieldSelector"))
        plural = request.resource.plural if request.resource else ""

        def match(resource: str, namespace: str | None, obj: dict[str, Any]) -> bool:
            return (resource == plural and (request.namespace is None or namespace == request.namespace)
                    and labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj))
        return match

    def _serve_list(self, request: kmock.Request) -> aiohttp.web.Response:
        assert request.resource is not None
        match = self._matches(request)
        plural = request.resource.plural or ""
        items = [obj for obj in self.items(request.resource, request.namespace)
                 if match(plural, obj.get("metadata", {}).get("namespace"), obj)]
        group = request.resource.group
        return aiohttp.web.json_response({
            "apiVersion": f"{group}/{request.resource.version}" if group else request.resource.version,
            "kind": KINDS.get(plural, "Object") + "List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        })

    async def _serve_watch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        raw = request._raw_request
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        match = self._matches(request)
        plural = request.resource.plural or ""
        since = request.params.get("resourceVersion") or ""
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        bookmarks = request.params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        deadline = time.monotonic() + timeout if timeout else None

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if since not in ("", "0") and int(since) < self.compacted_rv:
            await send("ERROR", status_body(410, "Expired", f"too old resource version: {since} "
                                            f"({self.compacted_rv})"))
            return response
        if since in ("", "0"):
            last = self.rv
            for obj in self.items(request.resource, request.namespace):
                if match(plural, obj.get("metadata", {}).get("namespace"), obj):
                    await send("ADDED", obj)
        else:
            last = int(since)
        stream = Stream("watch")
        self.streams.append(stream)
        self.peak_watches = max(self.peak_watches, len(self.watches()))
        try:
            last_bookmark = time.monotonic()
            while True:
                if stream.drop:
                    if raw.transport is not None:
                        raw.transport.abort()
                    return response
                if stream.expire:
                    await send("ERROR", status_body(410, "Expired", "too old resource version"))
                    return response
                while stream.inject:
                    await response.write(stream.inject.pop(0))
                pending = [e for e in self.history if e.rv > last] if not stream.silent else []
                for event in pending:
                    last = event.rv
                    if match(event.resource, event.namespace, event.obj):
                        await send(event.type, event.obj)
                if bookmarks and not stream.silent and time.monotonic() - last_bookmark > self.bookmark_interval:
                    await send("BOOKMARK", {"kind": KINDS.get(plural, "Object"), "apiVersion": "v1",
                                            "metadata": {"resourceVersion": str(last)}})
                    last_bookmark = time.monotonic()
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return response
                await self._wait_change(wait)
        except (ConnectionResetError, RuntimeError):
            return response
        finally:
            self.streams.remove(stream)

    # --- logs ----------------------------------------------------------------------------------------
    async def _serve_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        namespace, name = request.namespace or "", request.name or ""
        pod = self.get(PODS, namespace, name)
        if pod is None:
            return error(404, "NotFound", f'pods "{name}" not found')
        container = request.params.get("container") or pod["spec"]["containers"][0]["name"]
        state = self._container_state(pod, container)
        if "waiting" in state or not state:
            reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
            return error(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        follow = request.params.get("follow", "").lower() in ("true", "1")
        stamps = request.params.get("timestamps", "").lower() in ("true", "1")
        since = request.params.get("sinceTime")
        if since:  # metav1.Time has one-second precision: the server answers from the start of that second
            since = since[:19]
        log = self.logs.setdefault((namespace, name, container), ContainerLog())
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        raw = request._raw_request
        await response.prepare(raw)
        drop_after, self.log_drop_after = self.log_drop_after, None
        stream = Stream("log")
        self.streams.append(stream)
        sent = 0
        index = 0
        try:
            while True:
                while index < len(log.lines):
                    stamp, text = log.lines[index]
                    index += 1
                    if since and stamp[:19] < since:
                        continue
                    line = (f"{stamp} {text}\n" if stamps else f"{text}\n").encode()
                    if stream.drop or (drop_after is not None and sent >= drop_after):
                        await response.write(line[: max(1, len(line) // 2)])  # cut mid-line
                        if raw.transport is not None:
                            raw.transport.abort()
                        return response
                    await response.write(line)
                    sent += 1
                if not follow or log.finished:
                    return response
                await self._wait_change(0.5, lambda seen=index: seen < len(log.lines) or log.finished)
        except (ConnectionResetError, RuntimeError):
            return response
        finally:
            self.streams.remove(stream)

    async def append_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        self.logs.setdefault((namespace, pod, container), ContainerLog()).lines.append((log_timestamp(), text))
        async with self._cond():
            self._cond().notify_all()

    # --- the Job controller --------------------------------------------------------------------------
    def _react(self, resource: kmock.resource, obj: dict[str, Any], kind: str) -> None:
        if resource == JOBS and kind == "ADDED":
            self._spawn(self._start_job(obj))
        elif resource == PODS and kind == "MODIFIED":
            phase = (obj.get("status") or {}).get("phase")
            key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
            if phase in ("Succeeded", "Failed") and key not in self.finished_pods:
                self.finished_pods.add(key)  # the controller reacts to a Pod's end once
                self._spawn(self._pod_finished(obj))

    def _react_deleted(self, resource: kmock.resource, obj: dict[str, Any]) -> None:
        pass

    def _job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return [p for p in self.items(PODS, namespace) if p["metadata"].get("labels", {}).get("job-name") == job]

    async def _start_job(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        await self.patch(JOBS, meta["namespace"], meta["name"], {"status": {"startTime": now_iso(), "active": 1}})
        await self._new_pod(job)
        deadline = job["spec"].get("activeDeadlineSeconds")
        if deadline:
            self._spawn(self._deadline(meta["namespace"], meta["name"], float(deadline)))

    async def _new_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"]["template"])
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update({"batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"],
                       "batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"]})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{meta['name']}-{suffix}", "namespace": meta["namespace"], "labels": labels,
                         "annotations": template.get("metadata", {}).get("annotations") or {},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": template["spec"],
            "status": {"phase": "Pending", "conditions": []},
        }
        created = await self.put(PODS, pod)
        if self.kubelet_mode == "run":
            self._spawn(self._kubelet(created))
        return created

    async def _deadline(self, namespace: str, name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        job = self.get(JOBS, namespace, name)
        if job is None or self._job_finished(job):
            return
        await self._fail_job(namespace, name, "DeadlineExceeded", "Job was active longer than specified deadline")
        for pod in self._job_pods(namespace, name):
            self._spawn(self.delete_pod(namespace, pod["metadata"]["name"]))

    @staticmethod
    def _job_finished(job: dict[str, Any]) -> bool:
        return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])

    async def _fail_job(self, namespace: str, name: str, reason: str, message: str) -> None:
        stamp = now_iso()
        job = self.get(JOBS, namespace, name) or {}
        conditions = list((job.get("status") or {}).get("conditions") or [])
        conditions += [{"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": stamp},
                       {"type": "Failed", "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": stamp}]
        await self.patch(JOBS, namespace, name, {"status": {"conditions": conditions, "active": 0}})
        self._spawn(self._ttl(namespace, name))

    async def _ttl(self, namespace: str, name: str) -> None:
        job = self.get(JOBS, namespace, name)
        ttl = (job or {}).get("spec", {}).get("ttlSecondsAfterFinished")
        if ttl is None or ttl > 600:
            return
        await asyncio.sleep(float(ttl))
        if self.get(JOBS, namespace, name) is not None:
            await self.remove(JOBS, namespace, name)
            for pod in self._job_pods(namespace, name):
                self._spawn(self.delete_pod(namespace, pod["metadata"]["name"]))

    async def _pod_finished(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        job_name = meta.get("labels", {}).get("job-name")
        if not job_name or meta.get("deletionTimestamp"):
            return
        if pod["status"]["phase"] == "Failed" and not any(
                c.get("type") == "DisruptionTarget" for c in pod["status"].get("conditions") or []):
            await asyncio.sleep(0.05)  # an eviction marks the Pod before its container ends: see it whole
            pod = self.get(PODS, namespace, meta["name"]) or pod
        job = self.get(JOBS, namespace, job_name)
        if job is None or self._job_finished(job):
            return
        status = job.get("status") or {}
        stamp = now_iso()
        if pod["status"]["phase"] == "Succeeded":
            await self.patch(JOBS, namespace, job_name, {"status": {
                "active": 0, "succeeded": 1, "completionTime": stamp,
                "conditions": [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                                "lastTransitionTime": stamp},
                               {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                "lastTransitionTime": stamp}]}})
            self._spawn(self._ttl(namespace, job_name))
            return
        rules = (job["spec"].get("podFailurePolicy") or {}).get("rules") or []
        disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                        for c in pod["status"].get("conditions") or [])
        codes = {c["name"]: (c.get("state") or {}).get("terminated", {}).get("exitCode")
                 for c in pod["status"].get("containerStatuses") or []}
        for index, rule in enumerate(rules):
            on_codes = rule.get("onExitCodes")
            if on_codes and codes.get(on_codes.get("containerName", "main")) in on_codes["values"] \
                    and rule["action"] == "FailJob":
                await self._fail_job(namespace, job_name, "PodFailurePolicy",
                                     f"Container {on_codes.get('containerName')} for pod {namespace}/{meta['name']} "
                                     f"failed with exit code {codes.get(on_codes.get('containerName'))} matching "
                                     f"FailJob rule at index {index}")
                return
            if rule.get("onPodConditions") and disrupted and rule["action"] == "Ignore":
                await self._new_pod(job)
                return
        failed = int(status.get("failed") or 0) + 1
        await self.patch(JOBS, namespace, job_name, {"status": {"failed": failed}})
        if failed > int(job["spec"].get("backoffLimit", 6)):
            await self._fail_job(namespace, job_name, "BackoffLimitExceeded",
                                 "Job has reached the specified backoff limit")
        else:
            await self._new_pod(job)

    # --- the kubelet ---------------------------------------------------------------------------------
    @staticmethod
    def _container_state(pod: dict[str, Any], container: str) -> dict[str, Any]:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status["name"] == container:
                return status.get("state") or {}
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status["name"] == container:
                return status.get("state") or {}
        return {}

    async def set_container(self, namespace: str, pod: str, container: str, state: dict[str, Any], *,
                            init: bool = False, phase: str | None = None, extra: dict[str, Any] | None = None,
                            ready: bool = False) -> None:
        current = self.get(PODS, namespace, pod)
        if current is None:
            return
        key = "initContainerStatuses" if init else "containerStatuses"
        statuses = [s for s in (current.get("status") or {}).get(key) or [] if s["name"] != container]
        spec = next((c for c in current["spec"].get("initContainers" if init else "containers") or []
                     if c["name"] == container), {"image": ""})
        statuses.append({"name": container, "image": spec.get("image", ""), "imageID": "", "ready": ready,
                         "restartCount": 0, "started": "running" in state, "state": state})
        status: dict[str, Any] = {key: statuses}
        if phase:
            status["phase"] = phase
        if extra:
            status.update(extra)
        await self.patch(PODS, namespace, pod, {"status": status})

    async def _kubelet(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        spec = pod["spec"]
        cpu, memory = self._requests(spec)
        if cpu > self.node_cpu or memory > self.node_memory:
            what = " ".join(w for w, over in (("Insufficient cpu.", cpu > self.node_cpu),
                                              ("Insufficient memory.", memory > self.node_memory)) if over)
            await self.patch(PODS, namespace, name, {"status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": f"0/1 nodes are available: 1 {what} preemption: 0/1 nodes are available: "
                           "1 No preemption victims found for incoming pod."}]}})
            return
        await self.patch(PODS, namespace, name, {"spec": {"nodeName": "harness-node"}, "status": {
            "conditions": [{"type": "PodScheduled", "status": "True"}], "startTime": now_iso()}})
        volumes = self._volumes(namespace, name, spec)
        for init in spec.get("initContainers") or []:
            code = await self._run_container(namespace, name, init, volumes, init=True)
            if code is None:
                return
            if code != 0:
                await self.patch(PODS, namespace, name, {"status": {"phase": "Failed"}})
                return
        for container in spec["containers"]:
            code = await self._run_container(namespace, name, container, volumes, init=False)
            if code is None:
                return
            phase = "Succeeded" if code == 0 else "Failed"
            current = self.get(PODS, namespace, name)
            if current is not None and not current["metadata"].get("deletionTimestamp"):
                await self.patch(PODS, namespace, name, {"status": {"phase": phase}})

    @staticmethod
    def _localize(text: str, mounts: dict[str, Path]) -> str:
        """A path inside the container, as the local directory that plays its volume."""
        for mount, path in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if text == mount or text.startswith(mount + "/"):
                return str(path) + text[len(mount):]
        return text.replace("cd /work", f"cd {mounts.get('/work', '/work')}")

    def _mounts(self, pod: dict[str, Any], container: str) -> dict[str, Path]:
        volumes = self._volumes(pod["metadata"]["namespace"], pod["metadata"]["name"], pod["spec"])
        spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
        return {m["mountPath"]: volumes[m["name"]] for m in spec.get("volumeMounts") or []}

    async def _serve_exec(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """pods/exec over a real WebSocket, speaking the Kubernetes channel protocol: the command runs
        in the Pod's (mapped) volumes; stdout and stderr stream as channel 1 and 2 frames, and the
        exit status comes on channel 3 before the close."""
        namespace, name = request.namespace or "", request.name or ""
        pod = self.get(PODS, namespace, name)
        if pod is None:
            return error(404, "NotFound", f'pods "{name}" not found')
        container = request.params.get("container") or pod["spec"]["containers"][0]["name"]
        if "running" not in self._container_state(pod, container):
            return error(400, "BadRequest", f"container {container} is not valid for pod {name}: not running")
        command = request._raw_request.query.getall("command", [])
        mounts = self._mounts(pod, container)
        argv = [self._localize(part, mounts) for part in command]
        ws = aiohttp.web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(request._raw_request)
        self.exec_commands.append(command)
        fault, limit = self.exec_faults.pop(0) if self.exec_faults else ("", 0)
        if fault == "stall":  # upgraded, then nothing at all until the client goes (or 120 s)
            try:
                await asyncio.wait_for(ws.receive(), 120)
            except TimeoutError:
                pass
            await ws.close()
            return ws
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            await ws.send_bytes(b"\x03" + json.dumps({"metadata": {}, "status": "Failure",
                                                       "message": f"exec failed: {exc}"}).encode())
            await ws.close()
            return ws

        sent = 0

        async def pump(stream: asyncio.StreamReader, channel: bytes) -> None:
            nonlocal sent
            while chunk := await stream.read(32 * 1024):
                if fault == "break" and channel == b"\x01":
                    chunk = chunk[:limit - sent]
                sent += len(chunk)
                if chunk:
                    await ws.send_bytes(channel + chunk)
                if fault == "break" and sent >= limit:
                    raise ConnectionAbortedError

        assert proc.stdout is not None and proc.stderr is not None
        try:
            await asyncio.gather(pump(proc.stdout, b"\x01"), pump(proc.stderr, b"\x02"))
        except ConnectionAbortedError:  # the connection breaks mid-stream: no status, no close frame
            proc.kill()
            await proc.wait()
            transport = request._raw_request.transport
            if transport is not None:
                transport.abort()
            return ws
        code = await proc.wait()
        status = {"metadata": {}, "status": "Success"} if code == 0 else {
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        await ws.close()
        return ws

    @staticmethod
    def _requests(spec: dict[str, Any]) -> tuple[float, float]:
        from keruta_prefect.validation import parse_quantity

        cpu = memory = 0.0
        for container in spec["containers"]:
            requests = (container.get("resources") or {}).get("requests") or {}
            cpu += parse_quantity(requests.get("cpu", "0"))
            memory += parse_quantity(requests.get("memory", "0"))
        return cpu, memory

    def _volumes(self, namespace: str, pod: str, spec: dict[str, Any]) -> dict[str, Path]:
        paths = {}
        for volume in spec.get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                path = self.root / "pvcs" / namespace / volume["persistentVolumeClaim"]["claimName"]
            else:
                path = self.root / "pods" / namespace / pod / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            paths[volume["name"]] = path
        return paths

    def _resolve_env(self, namespace: str, container: dict[str, Any]) -> tuple[dict[str, str] | None, str]:
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                           lambda m: env.get(m[1], m[0]), item["value"])
                continue
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                continue
            secret = self.get(SECRETS, namespace, ref["name"])
            if secret is None:
                if ref.get("optional"):
                    continue
                return None, f'secret "{ref["name"]}" not found'
            data = secret.get("data") or {}
            if ref["key"] in data:
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif ref["key"] in (secret.get("stringData") or {}):
                env[item["name"]] = secret["stringData"][ref["key"]]
            elif not ref.get("optional"):
                return None, f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
        return env, ""

    async def _run_container(self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path],
                             *, init: bool) -> int | None:
        """Run one container to its end; None when the Pod cannot proceed (pull or config error)."""
        name = container["name"]
        image = container["image"]
        from keruta_prefect.validation import IMAGE_REF

        if not IMAGE_REF.match(image):
            await self.set_container(namespace, pod, name, {"waiting": {
                "reason": "InvalidImageName", "message": f'Failed to apply default image tag "{image}": couldn\'t '
                f"parse image name \"{image}\": invalid reference format"}}, init=init)
            return None
        if image in self.unpullable:
            await self.set_container(namespace, pod, name, {"waiting": {
                "reason": "ErrImagePull", "message": f'rpc error: code = NotFound desc = failed to pull and unpack '
                f'image "{image}": not found'}}, init=init)
            await asyncio.sleep(0.3)
            await self.set_container(namespace, pod, name, {"waiting": {
                "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}, init=init)
            return None
        env, problem = self._resolve_env(namespace, container)
        if env is None:
            await self.set_container(namespace, pod, name, {"waiting": {
                "reason": "CreateContainerConfigError", "message": problem}}, init=init)
            return None
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or []}

        def local(text: str) -> str:
            return self._localize(text, mounts)

        expand = lambda text: re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)  # noqa: E731
        command = [local(expand(part)) for part in (container.get("command") or []) + (container.get("args") or [])]
        if command and command[0] == "keruta-agent":
            command = [sys.executable, "-m", "keruta_prefect.agent", *command[1:]]
        proc_env = {k: local(v) for k, v in env.items()}
        proc_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
        for index, (url, path) in enumerate(self.git_remotes.items()):
            proc_env[f"GIT_CONFIG_KEY_{index}"] = f"url.{path}.insteadOf"
            proc_env[f"GIT_CONFIG_VALUE_{index}"] = url
        if self.git_remotes:
            proc_env["GIT_CONFIG_COUNT"] = str(len(self.git_remotes))
        workdir = local(container.get("workingDir") or "/")
        if not Path(workdir).is_dir():
            workdir = str(self.root)
        started = now_iso()
        proc = await asyncio.create_subprocess_exec(
            *command, env=proc_env, cwd=workdir, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.processes[(namespace, pod)] = proc
        await self.set_container(namespace, pod, name, {"running": {"startedAt": started}}, init=init,
                                 phase=None if init else "Running", ready=not init)
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            await self.append_log(namespace, pod, name, raw.decode("utf-8", "replace").rstrip("\n"))
        code = await proc.wait()
        self.processes.pop((namespace, pod), None)
        self.logs.setdefault((namespace, pod, name), ContainerLog()).finished = True
        oom = (namespace, pod) in self.oom
        exit_code = 137 if oom else (128 - code if code < 0 else code)
        reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        current = self.get(PODS, namespace, pod)
        if current is None:
            return None
        await self.set_container(namespace, pod, name, {"terminated": {
            "exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now_iso()}}, init=init)
        async with self._cond():
            self._cond().notify_all()
        if current["metadata"].get("deletionTimestamp"):
            return None
        return exit_code

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        """Signal the container: SIGTERM reaches its main process group (as the runtime sends it to PID 1);
        SIGKILL ends every process of its session, as a container's end does."""
        from keruta_prefect.backends.local import session_processes

        targets = session_processes(proc.pid) if sig == signal.SIGKILL else [proc.pid]
        for pid in targets or [proc.pid]:
            try:
                if pid == proc.pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Graceful deletion: deletionTimestamp, SIGTERM, grace period, SIGKILL, then the Pod is gone."""
        if self.get(PODS, namespace, name) is None:
            return
        await self.patch(PODS, namespace, name, {"metadata": {"deletionTimestamp": now_iso(),
                                                              "deletionGracePeriodSeconds": int(self.grace_seconds)}})
        if await self._stop_container(namespace, name):
            await asyncio.sleep(0.05)
        if (namespace, name) in self.stuck_pods:
            return  # a finalizer nobody removes: the Pod stays, marked for deletion
        await self.remove(PODS, namespace, name)

    async def _stop_container(self, namespace: str, pod: str) -> bool:
        """What the kubelet does to stop a container: SIGTERM, the grace period, SIGKILL. False if none ran."""
        proc = self.processes.get((namespace, pod))
        if proc is None:
            return False
        self._signal(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.grace_seconds)
        except TimeoutError:
            self._signal(proc, signal.SIGKILL)
            await proc.wait()
        return True

    # --- what a test does to the cluster (thread-safe) -----------------------------------------------
    def pods(self, namespace: str = "default", job: str | None = None) -> list[dict[str, Any]]:
        pods = self.items(PODS, namespace)
        return [p for p in pods if job is None or p["metadata"].get("labels", {}).get("job-name") == job]

    def jobs(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.items(JOBS, namespace)

    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get(JOBS, namespace, name)

    def create_secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.call(self.put(SECRETS, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                     "metadata": {"name": name, "namespace": namespace}, "data": encoded}))

    def create_namespace(self, name: str) -> None:
        self.namespaces.add(name)
        self.call(self.put(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_for_pod(self, job: str, namespace: str = "default", running: bool = False) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for pod in self.pods(namespace, job):
                if not running or (pod.get("status") or {}).get("phase") == "Running":
                    return pod
            return None
        return self.wait_for(found, what=f"a pod of job {job}")

    def finish_pod(self, pod: str, exit_code: int = 0, namespace: str = "default", reason: str | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        """Manual kubelet: the main container ends with ``exit_code``."""
        state = {"terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                                "startedAt": now_iso(), "finishedAt": now_iso()}}
        self.logs.setdefault((namespace, pod, "main"), ContainerLog()).finished = True
        self.call(self.set_container(namespace, pod, "main", state, phase="Succeeded" if exit_code == 0 else "Failed",
                                     extra=extra))

    def run_pod(self, pod: str, namespace: str = "default") -> None:
        """Manual kubelet: the main container is running."""
        self.call(self.set_container(namespace, pod, "main", {"running": {"startedAt": now_iso()}},
                                     phase="Running", ready=True))

    def wait_container(self, pod: str, reason: str, message: str = "", namespace: str = "default",
                       container: str = "main", init: bool = False) -> None:
        self.call(self.set_container(namespace, pod, container, {"waiting": {"reason": reason, "message": message}},
                                     init=init))

    def log(self, pod: str, *lines: str, namespace: str = "default", container: str = "main") -> None:
        async def _append() -> None:
            for line in lines:
                await self.append_log(namespace, pod, container, line)
        self.call(_append())

    def end_log(self, pod: str, namespace: str = "default", container: str = "main") -> None:
        self.logs.setdefault((namespace, pod, container), ContainerLog()).finished = True
        self.call(self._notify())

    async def _notify(self) -> None:
        async with self._cond():
            self._cond().notify_all()

    def oom_kill(self, pod: str, namespace: str = "default") -> None:
        self.oom.add((namespace, pod))
        proc = self.processes.get((namespace, pod))
        if proc is not None:
            self._signal(proc, signal.SIGKILL)

    def evict(self, pod: str, namespace: str = "default") -> None:
        async def _evict() -> None:
            await self.patch(PODS, namespace, pod, {"status": {"conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "message": "Eviction API: evicting"}]}})
            await self._stop_container(namespace, pod)  # as on any deletion
            await self.set_container(namespace, pod, "main", {"terminated": {
                "exitCode": 137, "reason": "Error", "startedAt": now_iso(), "finishedAt": now_iso()}},
                phase="Failed", extra={"reason": "Evicted", "message": "The node was low on resource: memory."})
        self.call(_evict())

    def delete_job(self, name: str, namespace: str = "default") -> None:
        """Someone else deletes the Job (background propagation)."""
        async def _delete() -> None:
            await self.remove(JOBS, namespace, name)
            for pod in self._job_pods(namespace, name):
                self._spawn(self.delete_pod(namespace, pod["metadata"]["name"]))
        self.call(_delete())

    def fail(self, count: int, status: int = 500, verb: str | None = None, resource: str | None = None) -> None:
        self.faults.append(Fault(count, status, verb, resource))

    def deny(self, resource: str, verb: str, subresource: str | None = None, namespace: str | None = None) -> None:
        """RBAC refuses the verb (in one namespace, or everywhere)."""
        if namespace is None:
            self.denied.add((resource, subresource, verb))
        else:
            self.denied_in.add((resource, subresource, verb, namespace))

    def stall_exec(self, count: int = 1) -> None:
        """The next ``count`` execs are upgraded to a WebSocket and then send nothing at all."""
        self.exec_faults.extend([("stall", 0)] * count)

    def break_exec(self, after_bytes: int) -> None:
        """The next exec's connection breaks after ``after_bytes`` bytes of stdout (no status, no close)."""
        self.exec_faults.append(("break", after_bytes))

    def inject_watch_lines(self, *lines: bytes) -> None:
        """Raw lines into every open watch stream, before its next event (e.g. b"\\n", a blank line)."""
        for stream in self.watches():
            stream.inject.extend(lines)
        self.call(self._notify())

    def stick_pod(self, pod: str, namespace: str = "default") -> None:
        """A finalizer nobody removes: deleting the Pod marks it, and it stays."""
        self.stuck_pods.add((namespace, pod))

    def unstick_pod(self, pod: str, namespace: str = "default") -> None:
        self.stuck_pods.discard((namespace, pod))
        self.call(self.remove(PODS, namespace, pod))

    def watches(self) -> list[Stream]:
        return [s for s in self.streams if s.kind == "watch"]

    def expire_watches(self) -> None:
        """Compact the history (old resourceVersions now get 410) and send 410 to open watches."""
        self.compacted_rv = self.rv
        for stream in self.watches():
            stream.expire = True
        self.call(self._notify())

    def drop_watches(self) -> None:
        for stream in self.watches():
            stream.drop = True
        self.call(self._notify())

    def silence_watches(self) -> None:
        for stream in self.watches():
            stream.silent = True

    def add_git_remote(self, url: str, files: dict[str, str]) -> Path:
        """A repository the clone init container can fetch `url` from (mapped with git's insteadOf)."""
        import subprocess

        path = self.root / "git" / f"repo-{len(self.git_remotes)}"
        work = path.with_suffix(".work")
        work.mkdir(parents=True)
        for name, content in files.items():
            (work / name).write_text(content)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=work, check=True)
        subprocess.run([*git, "add", "."], cwd=work, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=work, check=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(path)], check=True)
        shutil.rmtree(work)
        self.git_remotes[url] = path
        return path

    def calls_of(self, verb: str | None = None, resource: str | None = None) -> list[Call]:
        return [c for c in self.calls
                if (verb is None or c.verb == verb) and (resource is None or c.resource == resource)]
