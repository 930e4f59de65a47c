"""What the harness serves, described as the API server describes itself: the resource catalogue, legacy
discovery (`/api`, `/apis`, APIResourceList per group version), aggregated discovery (apidiscovery.k8s.io
v2 and v2beta1, when the client's Accept header asks for it, as kubectl ≥ 1.26 does) and OpenAPI v3
(`/openapi/v3` and one document per group version, built from the schemas kubernetes-validate ships).

kubectl needs all three: discovery to map `pods`, `job/NAME` or `po` to a resource, OpenAPI v3 to know that
the server validates fields itself (a PATCH operation with a `fieldValidation` query parameter), and the
schemas' patch strategies for `apply`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate

from .protobuf import field

OPENAPI_VERSION = "1.33"  # the Kubernetes version the harness says it is (apiserver.VERSION)
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short: tuple[str, ...] = ()
    verbs: tuple[str, ...] = tuple(ALL_VERBS)
    categories: tuple[str, ...] = ()
    subresources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, verbs)
    definition: str = ""  # the OpenAPI definition's name; "" for kinds without a schema of their own

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


_STATUS = (("status", ("get", "patch", "update")),)
CATALOGUE: tuple[Kind, ...] = (
    Kind("", "v1", "pods", "Pod", short=("po",), categories=("all",),
         subresources=(("exec", ("create", "get")), ("log", ("get",)), *_STATUS),
         definition="io.k8s.api.core.v1.Pod"),
    Kind("", "v1", "secrets", "Secret", definition="io.k8s.api.core.v1.Secret"),
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",),
         verbs=("create", "delete", "get", "list", "patch", "update", "watch"), subresources=_STATUS,
         definition="io.k8s.api.core.v1.Namespace"),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), subresources=_STATUS,
         definition="io.k8s.api.core.v1.PersistentVolumeClaim"),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",),
         definition="io.k8s.api.core.v1.ServiceAccount"),
    Kind("", "v1", "services", "Service", short=("svc",), categories=("all",), subresources=_STATUS,
         verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
         definition="io.k8s.api.core.v1.Service"),
    Kind("", "v1", "configmaps", "ConfigMap", short=("cm",), definition="io.k8s.api.core.v1.ConfigMap"),
    Kind("", "v1", "events", "Event", short=("ev",), definition="io.k8s.api.core.v1.Event"),
    Kind("batch", "v1", "jobs", "Job", categories=("all",), subresources=_STATUS,
         definition="io.k8s.api.batch.v1.Job"),
    Kind("apps", "v1", "deployments", "Deployment", short=("deploy",), categories=("all",), subresources=_STATUS,
         definition="io.k8s.api.apps.v1.Deployment"),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", definition="io.k8s.api.rbac.v1.Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding",
         definition="io.k8s.api.rbac.v1.RoleBinding"),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short=("netpol",),
         definition="io.k8s.api.networking.v1.NetworkPolicy"),
    Kind("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", namespaced=False,
         verbs=("create",), definition="io.k8s.api.authorization.v1.SelfSubjectAccessReview"),
)
SUBRESOURCE_KINDS = {"log": "Pod", "exec": "PodExecOptions"}  # what they answer; `status` answers the kind itself
BY_PLURAL = {(k.group, k.plural): k for k in CATALOGUE}


def kind_of(group: str, plural: str) -> Kind | None:
    return BY_PLURAL.get((group, plural))


def group_versions() -> dict[str, list[Kind]]:
    """Every group version the harness serves (core "v1" first), with its kinds in catalogue order."""
    out: dict[str, list[Kind]] = {}
    for kind in CATALOGUE:
        out.setdefault(kind.group_version, []).append(kind)
    return out


# --- legacy discovery ------------------------------------------------------------------------------------
def api_versions(server_address: str) -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def api_group_list() -> dict[str, Any]:
    groups = []
    for group_version in group_versions():
        if "/" not in group_version:
            continue
        group, version = group_version.split("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str) -> dict[str, Any] | None:
    for entry in api_group_list()["groups"]:
        if entry["name"] == group:
            return {"kind": "APIGroup", "apiVersion": "v1", **entry}
    return None


def api_resource_list(group_version: str) -> dict[str, Any] | None:
    kinds = group_versions().get(group_version)
    if kinds is None:
        return None
    resources: list[dict[str, Any]] = []
    for kind in kinds:
        resources.append({"name": kind.plural, "singularName": kind.singular, "namespaced": kind.namespaced,
                          "kind": kind.kind, "verbs": list(kind.verbs),
                          **({"shortNames": list(kind.short)} if kind.short else {}),
                          **({"categories": list(kind.categories)} if kind.categories else {})})
        for sub, verbs in kind.subresources:
            sub_kind = SUBRESOURCE_KINDS.get(sub, kind.kind)
            resources.append({"name": f"{kind.plural}/{sub}", "singularName": "", "namespaced": kind.namespaced,
                              "kind": sub_kind, "verbs": list(verbs)})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


# --- aggregated discovery (KEP-3352) ---------------------------------------------------------------------
AGGREGATED = re.compile(r"g=apidiscovery\.k8s\.io;\s*v=(v2beta1|v2);\s*as=APIGroupDiscoveryList")


def aggregated_version(accept: str) -> str | None:
    """The apidiscovery version the client asks for first in ``accept`` (None: legacy discovery)."""
    for part in accept.split(","):
        match = AGGREGATED.search(part)
        if match:
            return match[1]
    return None


def aggregated(legacy_core: bool, version: str) -> dict[str, Any]:
    """The APIGroupDiscoveryList of `/api` (``legacy_core``) or `/apis`."""
    items = []
    for group_version, kinds in group_versions().items():
        if ("/" not in group_version) != legacy_core:
            continue
        group, _, gv_version = group_version.rpartition("/")
        resources = []
        for kind in kinds:
            entry: dict[str, Any] = {
                "resource": kind.plural, "responseKind": {"group": kind.group, "version": kind.version,
                                                          "kind": kind.kind},
                "scope": "Namespaced" if kind.namespaced else "Cluster", "singularResource": kind.singular,
                "verbs": list(kind.verbs)}
            if kind.short:
                entry["shortNames"] = list(kind.short)
            if kind.categories:
                entry["categories"] = list(kind.categories)
            if kind.subresources:
                entry["subresources"] = [
                    {"subresource": sub, "verbs": list(verbs),
                     "responseKind": {"group": kind.group, "version": kind.version,
                                      "kind": SUBRESOURCE_KINDS.get(sub, kind.kind)}}
                    for sub, verbs in kind.subresources]
            resources.append(entry)
        items.append({"metadata": {"name": group, "creationTimestamp": None},
                      "versions": [{"version": gv_version, "resources": resources, "freshness": "Current"}]})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{version}",
            "metadata": {}, "items": items}


def aggregated_content_type(version: str) -> str:
    return f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"


# --- OpenAPI v3 ------------------------------------------------------------------------------------------
def _openapi_types(node: Any) -> Any:
    """JSON Schema's type lists (["string", "null"]) as OpenAPI 3.0 says them: one type and `nullable`
    (["integer", "string"] is an IntOrString); kubectl explain parses nothing else."""
    if isinstance(node, list):
        return [_openapi_types(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_types(value) for key, value in node.items()}
    kinds = out.get("type")
    if isinstance(kinds, list):
        real = [k for k in kinds if k != "null"]
        del out["type"]
        if "null" in kinds:
            out["nullable"] = True
        if len(real) == 1:
            out["type"] = real[0]
        elif set(real) == {"integer", "string"}:
            out["x-kubernetes-int-or-string"] = True
    return out


@functools.cache
def definitions() -> dict[str, Any]:
    """Kubernetes' schemas (the version the harness says it is), as OpenAPI v3 components."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{OPENAPI_VERSION}.0-local"
    text = (root / "_definitions.json").read_text()
    defs: dict[str, Any] = json.loads(text.replace('"#/$defs/', '"#/components/schemas/'))["$defs"]
    return {name: _openapi_types(schema) for name, schema in defs.items()}


def _closure(names: list[str]) -> dict[str, Any]:
    """The named schemas and every schema they refer to, as OpenAPI components."""
    defs, out, todo = definitions(), {}, list(names)
    while todo:
        name = todo.pop()
        if name in out or name not in defs:
            continue
        out[name] = defs[name]
        todo.extend(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(defs[name])))
    return out


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}} for name in names]


def _operations(kind: Kind) -> dict[str, dict[str, Any]]:
    """The paths of one kind, with the operations a client looks for (GVK extension and query parameters)."""
    gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
    body = {"content": {"*/*": {"schema": _ref(kind.definition)}}, "required": True}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(kind.definition)}}}}

    def op(action: str, *params: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"operationId": f"{action}{kind.kind}", "parameters": _query(*params),
                               "responses": ok, "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}
        if request is not None:
            out["requestBody"] = request
        return out

    prefix = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
    collection = f"{prefix}/namespaces/{{namespace}}/{kind.plural}" if kind.namespaced else f"{prefix}/{kind.plural}"
    writes = ("dryRun", "fieldManager", "fieldValidation", "pretty")
    paths: dict[str, dict[str, Any]] = {collection: {"post": op("post", *writes, request=body)}}
    if "list" in kind.verbs:
        paths[collection]["get"] = op("list", "labelSelector", "fieldSelector", "resourceVersion", "watch")
    if "get" in kind.verbs:
        paths[f"{collection}/{{name}}"] = {
            "get": op("get", "pretty"), "put": op("put", *writes, request=body),
            "patch": op("patch", *writes, "force", request=body),
            "delete": op("delete", "dryRun", "gracePeriodSeconds", "propagationPolicy")}
    return paths


@functools.cache
def openapi_document(group_version: str) -> bytes | None:
    """The OpenAPI v3 document of one group version (JSON), or None if the harness does not serve it."""
    kinds = [k for k in group_versions().get(group_version, []) if k.definition]
    if not kinds:
        return None
    paths: dict[str, Any] = {}
    for kind in kinds:
        paths.update(_operations(kind))
    names = [k.definition for k in kinds] + ["io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                                             "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions"]
    doc = {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": f"v{OPENAPI_VERSION}.0"},
           "paths": paths, "components": {"schemas": copy.deepcopy(_closure(names))}}
    return json.dumps(doc).encode()


def openapi_path(group_version: str) -> str:
    return f"apis/{group_version}" if "/" in group_version else f"api/{group_version}"


@functools.cache
def openapi_index() -> dict[str, Any]:
    paths = {}
    for group_version in group_versions():
        doc = openapi_document(group_version)
        if doc is None:
            continue
        digest = hashlib.sha512(doc).hexdigest().upper()
        path = openapi_path(group_version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}


# --- OpenAPI v2, as gnostic's protobuf (github.com/google/gnostic-models/openapiv2/OpenAPIv2.proto) ---------
# kubectl ≤ 1.27 asks for /openapi/v2 only in this encoding, to learn whether the server validates fields
# itself (a PATCH operation of the kind with a `fieldValidation` query parameter). The document carries those
# operations and no definitions: kubectl then builds patches from its own types, as it does for built-in kinds.
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"  # what the client accepts
OPENAPI_V2_CONTENT_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"  # what kube-openapi answers


def _v2_operation(kind: Kind, action: str, params: tuple[str, ...]) -> bytes:
    gvk = f"group: \"{kind.group}\"\nkind: {kind.kind}\nversion: {kind.version}\n"
    # Parameter → NonBodyParameter (2) → QueryParameterSubSchema (3): in = 2, name = 4, type = 6
    parameters = b"".join(
        field(8, field(1, field(2, field(3, field(2, "query") + field(4, name) + field(6, "string")))))
        for name in params)
    extensions = field(13, field(1, "x-kubernetes-group-version-kind") + field(2, field(2, gvk))) + \
        field(13, field(1, "x-kubernetes-action") + field(2, field(2, action)))
    return field(5, f"{action}{kind.kind}") + parameters + extensions


@functools.cache
def openapi_v2_protobuf() -> bytes:
    paths = b""
    writes = ("dryRun", "fieldManager", "fieldValidation", "pretty")
    for kind in CATALOGUE:
        if "patch" not in kind.verbs:
            continue
        prefix = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
        scope = f"{prefix}/namespaces/{{namespace}}/" if kind.namespaced else f"{prefix}/"
        item = field(2, _v2_operation(kind, "get", ("pretty",))) + \
            field(3, _v2_operation(kind, "put", writes)) + \
            field(8, _v2_operation(kind, "patch", (*writes, "force")))
        paths += field(2, field(1, f"{scope}{kind.plural}/{{name}}") + field(2, item))
    info = field(1, "Kubernetes") + field(2, f"v{OPENAPI_VERSION}.0")
    return field(1, "2.0") + field(2, info) + field(8, paths)
