"""The API server in front of kmock's emulator: /version, RBAC (403s from the test's policy) and
SelfSubjectAccessReviews, injected error statuses, Namespaces, create with the API server's defaults,
validation (kubernetes-validate for every supported version, quantities as the API decodes them) and
server-side dry run, deletion with propagation policies; list and watch (watch.py); pods/log (logs.py) and
pods/exec (exec.py). Every request is recorded as a ``Call``."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes_validate
from multidict import CIMultiDict, CIMultiDictProxy

from . import discovery, patches, protobuf, tables
from .common import JOBS, KINDS, NAMESPACES, PODS, RESOURCES, Call, error, not_found, now_iso
from .controller import JobController
from .faults import Faults
from .kubelet import Kubelet
from .store import Store
from .validate import quantity_problems, versions
from .watch import ListWatch

# Every kind with a schema is validated strictly when written through the API (Pods the controller makes are not).
VALIDATED = {k.plural for k in discovery.CATALOGUE if k.definition and k.plural != "selfsubjectaccessreviews"}
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-harness", "gitCommit": "0" * 40,
           "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
           "compiler": "gc", "platform": "linux/amd64"}
Fallback = Callable[[Any], Awaitable[aiohttp.web.StreamResponse]]
Handler = Callable[[kmock.Request], Awaitable[aiohttp.web.StreamResponse]]
NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(/[^/]+)?/?")
CLUSTER_SCOPE = "~cluster~"  # not a valid namespace name, so never a real one


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator, with every request going through ``api`` first (kmock's own handling is its
    fallback for plain get, patch and update)."""

    api: Any = None

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser reads `/api/v1/namespaces[/NAME]` as "in namespace NAME" (and fails on the bare
        # collection): hand it a path it parses as the cluster-scoped resource, and put the scope back below.
        found = NAMESPACE_PATH.fullmatch(raw.path)
        if found is not None:
            path = f"/api/v1/namespaces/{CLUSTER_SCOPE}/namespaces{found[1] or ''}"
            raw = raw.clone(rel_url=raw.rel_url.with_path(path).with_query(raw.rel_url.query))
        if raw.headers.get("Content-Type", "").startswith(protobuf.CONTENT_TYPE):
            # kubectl's typed clients (create namespace/secret, auth can-i) send protobuf; kmock reads every body
            # as UTF-8 text, so it gets the JSON the body encodes instead.
            headers = {k: v for k, v in raw.headers.items() if k.lower() != "content-length"}
            raw = raw.clone(headers=CIMultiDictProxy(CIMultiDict({**headers, "Content-Type": "application/json"})))
            try:
                body = json.dumps(protobuf.decode(await raw.read())).encode()
            except protobuf.Unsupported as exc:
                return error(415, "UnsupportedMediaType", str(exc))
            raw._read_bytes = body  # what aiohttp's read(), text() and json() return from now on
        return await super().__call__(raw)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.namespace == CLUSTER_SCOPE:
            request = attrs.evolve(request, namespace=None)
        return await self.api.handle(request, super()._handle)


class ApiServer:
    def __init__(self, store: Store, faults: Faults, controller: JobController, kubelet: Kubelet,
                 subresources: dict[str, Handler], *, root: Path, validate: bool = True) -> None:
        self.store = store
        self.faults = faults
        self.controller = controller
        self.kubelet = kubelet
        self.subresources = subresources  # "log", "exec": served by the kubelet's side
        self.lists = ListWatch(store, faults)
        self.root = root
        self.validate = validate
        self.calls: list[Call] = []
        self.namespaces: set[str] = {"default"}  # created at start; then they live in the store like any object
        self.validation_errors: list[str] = []

    def _call(self, request: kmock.Request, method: str, is_watch: bool) -> Call:
        """The request as RBAC sees it."""
        assert request.resource is not None
        verb = VERBS.get(method, method.lower())
        if method == "GET" and request.name is None:
            verb = "watch" if is_watch else "list"
        if request.subresource == "exec":
            verb = "create"  # WebSocket exec is authorized as `create` on pods/exec
        name = request.name
        if verb == "create" and request.subresource is None and isinstance(request.data, dict):
            name = request.data.get("metadata", {}).get("name")
        return Call(verb, request.resource.group or "", request.resource.plural or "", request.subresource,
                    request.namespace, name)

    async def handle(self, request: kmock.Request, fallback: Fallback) -> aiohttp.web.StreamResponse:
        resource = request.resource
        is_watch = request.params.get("watch", "").lower() in ("true", "1")
        method = str(getattr(request.method, "value", request.method)).upper()
        if request.url.path in ("/version", "/version/"):  # the official client asks for /version/
            return aiohttp.web.json_response(VERSION)
        if method == "GET":
            described = self._describe(request)
            if described is not None:
                return described
        if resource is None:
            return await fallback(request)
        call = self._call(request, method, is_watch)
        self.calls.append(call)
        refused = self.faults.refusal(call)
        if refused is not None:
            return refused
        if call.resource == "selfsubjectaccessreviews":
            return self._access_review(request)
        if call.verb == "create" and request.namespace and \
                self.store.get(NAMESPACES, None, request.namespace) is None:
            return error(404, "NotFound", f'namespaces "{request.namespace}" not found')
        if call.verb == "get" and request.subresource is None:
            return self._get(request, call.name or "")
        if request.subresource in self.subresources:
            return await self.subresources[request.subresource](request)
        if is_watch:
            return await self.lists.watch(request)
        if call.verb == "list":
            return self.lists.list(request)
        if call.verb == "create" and request.subresource is None:
            return await self._create(request)
        if call.verb == "delete" and call.name is not None:
            return await self._delete(request)
        if call.verb in ("patch", "update") and request.subresource in (None, "status") and call.name:
            return await self._write(request, call.verb, call.name)
        if call.verb == "delete":  # a collection
            return error(405, "MethodNotAllowed", "deletecollection is not served by the harness cluster; delete "
                                                  "each object")
        if request.subresource is not None or call.verb in ("patch", "update"):
            return error(404, "NotFound", "the server could not find the requested resource")
        return await fallback(request)

    async def _write(self, request: kmock.Request, verb: str, name: str) -> aiohttp.web.Response:
        """PATCH (every content type the API server takes, patches.py) and PUT, on the object or its status;
        dryRun=All answers without storing."""
        assert request.resource is not None
        resource, namespace = request.resource, request.namespace
        current = self.store.get(resource, namespace, name)
        plural = resource.plural or ""
        if current is None:
            return not_found(resource, name)
        kind = discovery.kind_of(resource.group or "", plural)
        if verb == "update":
            if not isinstance(request.data, dict):
                return error(400, "BadRequest", "the body of the request was in an unknown format")
            new = copy.deepcopy(request.data)
            sent = (new.get("metadata") or {}).get("resourceVersion")
            if sent and sent != current["metadata"].get("resourceVersion"):
                return error(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the object has '
                                              "been modified; please apply your changes to the latest version and "
                                              "try again")
        else:
            try:
                new = patches.apply(current, request.data, request.headers.get("Content-Type", ""),
                                    kind.definition if kind else "")
            except patches.PatchError as exc:
                reason = {415: "UnsupportedMediaType", 422: "Invalid"}.get(exc.status, "BadRequest")
                return error(exc.status, reason, str(exc))
        has_status = kind is not None and any(sub == "status" for sub, _ in kind.subresources)
        if request.subresource == "status":  # only the status changes
            new = {**current, "status": new.get("status", current.get("status"))}
        elif has_status and "status" in current:  # and never through the object itself
            new["status"] = current["status"]
        meta = new.setdefault("metadata", {})
        for key in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        invalid = await self._invalid(new, resource)
        if invalid is not None:
            return invalid
        if request.params.get("dryRun") == "All":
            return aiohttp.web.json_response(new)
        await self.store.replace(resource, namespace, name, new)
        return aiohttp.web.json_response(self.store.get(resource, namespace, name))

    def _get(self, request: kmock.Request, name: str) -> aiohttp.web.Response:
        """One object, as itself or (for `kubectl get`) as a Table row."""
        assert request.resource is not None
        found = self.store.get(request.resource, request.namespace, name)
        if found is None:
            return not_found(request.resource, name)
        version = tables.wants_table(request.headers.get("Accept", ""))
        if version is not None:
            return aiohttp.web.json_response(tables.table(request.resource.plural or "", [found], version,
                                                          found["metadata"].get("resourceVersion", "")))
        return aiohttp.web.json_response(found)

    def _describe(self, request: kmock.Request) -> aiohttp.web.Response | None:
        """Discovery and OpenAPI v3 (discovery.py), or None for every other path."""
        path = request.url.path.rstrip("/")
        accept = request.headers.get("Accept", "")
        if path in ("/api", "/apis"):
            version = discovery.aggregated_version(accept)
            if version is not None:  # as kube-apiserver: the client's first acceptable representation
                return aiohttp.web.json_response(discovery.aggregated(path == "/api", version),
                                                 content_type=discovery.aggregated_content_type(version))
            return aiohttp.web.json_response(discovery.api_versions(request.url.host or "127.0.0.1")
                                             if path == "/api" else discovery.api_group_list())
        if path == "/openapi/v3":
            return aiohttp.web.json_response(discovery.openapi_index())
        if path.startswith("/openapi/v3/"):
            doc = discovery.openapi_document(path.removeprefix("/openapi/v3/").partition("/")[2])
            if doc is None:
                return error(404, "NotFound", "the server could not find the requested resource")
            return aiohttp.web.Response(body=doc, content_type="application/json",
                                        headers={"Cache-Control": "public, immutable"})
        if path == "/openapi/v2" and discovery.OPENAPI_V2_PROTOBUF in accept:
            return aiohttp.web.Response(body=discovery.openapi_v2_protobuf(),
                                        headers={"Content-Type": discovery.OPENAPI_V2_CONTENT_TYPE})
        if path.startswith("/openapi/"):  # v2 only as protobuf (what kubectl reads): JSON v2 is not served
            return error(404, "NotFound", "the server could not find the requested resource")
        found = re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)|/apis/([^/]+)", path)
        if found is None:
            return None
        if found[4] is not None:
            group = discovery.api_group(found[4])
            return aiohttp.web.json_response(group) if group is not None else \
                error(404, "NotFound", "the server could not find the requested resource")
        listed = discovery.api_resource_list(found[1] or f"{found[2]}/{found[3]}")
        return aiohttp.web.json_response(listed) if listed is not None else \
            error(404, "NotFound", "the server could not find the requested resource")

    def _access_review(self, request: kmock.Request) -> aiohttp.web.Response:
        review = copy.deepcopy(request.data or {})
        attrs_ = (review.get("spec") or {}).get("resourceAttributes") or {}
        allowed = self.faults.allows(attrs_.get("resource", ""), attrs_.get("subresource") or None,
                                     attrs_.get("verb", ""), attrs_.get("namespace") or None)
        review["status"] = {"allowed": allowed}  # RBAC gives no reason when nothing allows it
        return aiohttp.web.json_response(review, status=201)

    async def _invalid(self, obj: dict[str, Any], resource: kmock.resource) -> aiohttp.web.Response | None:
        """400 for quantities the API cannot decode, 422 for what a supported version's schema refuses."""
        plural = resource.plural or ""
        kind = f"{KINDS.get(plural, 'Object')}.{resource.group or 'core'}"
        name = obj["metadata"].get("name")
        problems = quantity_problems(obj, plural)
        if problems:
            message = f'{kind} "{name}" cannot be handled as a {KINDS.get(plural)}: {"; ".join(problems)}'
            self.validation_errors.append(message)
            return error(400, "BadRequest", message)
        if not self.validate or plural not in VALIDATED:
            return None
        for version in versions():
            try:  # off the loop: validation takes ~30 ms a version, and watches must keep flowing
                await asyncio.to_thread(kubernetes_validate.validate, obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                message = f'{kind} "{name}" is invalid for Kubernetes {version}: {exc.message}'
                self.validation_errors.append(message)
                return error(422, "Invalid", message)
        return None

    async def _create(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        obj = request.data
        if not isinstance(obj, dict):
            return error(400, "BadRequest", "the body of the request was in an unknown format")
        meta = obj.setdefault("metadata", {})
        if request.namespace is None:
            meta.pop("namespace", None)  # cluster-scoped
        elif meta.setdefault("namespace", request.namespace) != request.namespace:
            return error(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                            "sent on the request")
        meta["creationTimestamp"] = now_iso()  # the server's, whatever the client sent
        plural = request.resource.plural or ""
        if plural == "namespaces":  # the API server's defaults for the kinds kubectl creates
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        if plural == "secrets" and not obj.get("type"):
            obj["type"] = "Opaque"
        invalid = await self._invalid(obj, request.resource)
        if invalid is not None:
            return invalid
        if self.store.get(request.resource, request.namespace, meta.get("name", "")) is not None:
            return error(409, "AlreadyExists",
                         f'{plural}{"." + request.resource.group if request.resource.group else ""} '
                         f'"{meta.get("name")}" already exists')
        if request.params.get("dryRun") == "All":
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
        if plural == "pods":  # a Pod made directly (not by the Job controller): the kubelet runs it too
            obj.setdefault("status", {"phase": "Pending"})
        created = await self.store.put(request.resource, obj)
        if plural == "pods":
            self.kubelet.admit(created)
        return aiohttp.web.json_response(created, status=201)

    async def _empty_namespace(self, namespace: str) -> None:
        for resource in RESOURCES:
            for obj in self.store.items(resource, namespace):
                name = obj["metadata"]["name"]
                if resource == JOBS:
                    await self.controller.delete_job(namespace, name, "Background")
                elif resource == PODS:
                    self.store.spawn(self.kubelet.delete_pod(namespace, name))
                else:
                    await self.store.remove(resource, namespace, name)

    async def _delete(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        namespace, name = request.namespace or "", request.name or ""
        current = self.store.get(request.resource, request.namespace, name)
        if current is None:
            return not_found(request.resource, name)
        body = request.data if isinstance(request.data, dict) else {}
        if request.params.get("dryRun") == "All" or "All" in (body.get("dryRun") or []):
            return aiohttp.web.json_response(current, status=200)
        policy = body.get("propagationPolicy") or request.params.get("propagationPolicy") or "Background"
        if request.resource.plural == "namespaces":  # what the namespace controller does: its objects go first
            await self._empty_namespace(name)
        if request.resource.plural == "jobs":
            await self.controller.delete_job(namespace, name, policy)
            if policy == "Foreground":  # marked, and still there until its Pods are gone
                return aiohttp.web.json_response(self.store.get(JOBS, request.namespace, name), status=200)
            return aiohttp.web.json_response(current, status=200)
        if request.resource.plural == "pods":
            self.store.spawn(self.kubelet.delete_pod(namespace, name))
            return aiohttp.web.json_response(current, status=200)
        if request.resource.plural == "persistentvolumeclaims":  # the volume's files go with it
            shutil.rmtree(self.root / "pvcs" / namespace / name, ignore_errors=True)
        await self.store.remove(request.resource, request.namespace, name)
        return aiohttp.web.json_response(current, status=200)
