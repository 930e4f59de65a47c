"""PATCH as the API server applies it, by content type: JSON patch (RFC 6902, with the `jsonpatch` library),
JSON merge patch (RFC 7386) and strategic merge patch — lists merged by the merge keys and patch strategies
the schemas carry (`x-kubernetes-patch-merge-key`, `x-kubernetes-patch-strategy`), and the directives
kubectl sends (`$patch: delete|replace`, `$setElementOrder/…`, `$retainKeys`, `$deleteFromPrimitiveList/…`).
Server-side apply (`application/apply-patch+yaml`) is not served: it is refused with 415, never half done."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .discovery import definitions

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


class PatchError(ValueError):
    """A patch that cannot be applied (the message says why); ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def apply(current: dict[str, Any], patch: Any, content_type: str, definition: str) -> dict[str, Any]:
    """``current`` with ``patch`` applied as ``content_type`` says; ``definition`` names the kind's schema."""
    kind = content_type.split(";")[0].strip()
    if kind == APPLY:
        raise PatchError(415, "server-side apply is not served by the harness cluster; use client-side apply")
    if kind == JSON_PATCH:
        if not isinstance(patch, list):
            raise PatchError(400, "a JSON patch is a list of operations")
        try:
            return jsonpatch.apply_patch(current, patch)  # type: ignore[no-any-return]
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise PatchError(422, f"the JSON patch cannot be applied: {exc}") from exc
    if not isinstance(patch, dict):
        raise PatchError(400, "the body of the patch is not a JSON object")
    if kind == MERGE_PATCH:
        return merge(current, patch)
    if kind == STRATEGIC:
        return strategic(current, patch, _resolve({"$ref": f"#/components/schemas/{definition}"}))
    raise PatchError(415, f"the patch's content type {content_type!r} is not one the API server accepts")


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def _resolve(schema: dict[str, Any] | None) -> dict[str, Any]:
    while schema and "$ref" in schema:
        schema = definitions().get(schema["$ref"].rsplit("/", 1)[-1], {})
    return schema or {}


def _field(schema: dict[str, Any], key: str) -> dict[str, Any]:
    """The schema of field ``key`` (its patch extensions kept beside a resolved item schema)."""
    prop = (schema.get("properties") or {}).get(key) or {}
    return prop if "$ref" not in prop else {**_resolve(prop), **{k: v for k, v in prop.items() if k != "$ref"}}


def strategic(original: dict[str, Any], patch: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(original)
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            out[name] = [item for item in out.get(name) or [] if item not in value]
            continue
        if value is None:
            out.pop(key, None)
            continue
        sub = _field(schema, key)
        if isinstance(value, dict) and value.get("$patch") == "delete":
            out.pop(key, None)
        elif isinstance(value, dict) and sub.get("type") != "string":
            existing = out.get(key)
            if "additionalProperties" in sub and "properties" not in sub:  # a map: merged key by key
                out[key] = merge(existing if isinstance(existing, dict) else {}, value)
            else:
                out[key] = strategic(existing if isinstance(existing, dict) else {}, value, sub)
        elif isinstance(value, list) and "merge" in str(sub.get("x-kubernetes-patch-strategy", "")).split(","):
            out[key] = _merge_list(out.get(key) or [], value, sub)
        else:
            out[key] = copy.deepcopy(value)
    for name, order in orders.items():
        out[name] = _ordered(out.get(name) or [], order, _field(schema, name).get("x-kubernetes-patch-merge-key"))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(original: list[Any], patch: list[Any], schema: dict[str, Any]) -> list[Any]:
    key = schema.get("x-kubernetes-patch-merge-key")
    if key is None:  # a list of primitives merged as a set, in order
        return [*original, *(item for item in patch if item not in original)]
    items = _resolve(schema.get("items"))
    out = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict):
            continue
        index = next((i for i, have in enumerate(out) if isinstance(have, dict) and have.get(key) == item.get(key)),
                     None)
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            out[index] = strategic(out[index], item, items)
    return out


def _ordered(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    """``items`` in the order `$setElementOrder` gives (those it does not name keep their place after)."""
    def ident(item: Any) -> Any:
        return item.get(key) if key and isinstance(item, dict) else item
    wanted = [o.get(key) if key and isinstance(o, dict) else o for o in order]
    return sorted(items, key=lambda item: wanted.index(ident(item)) if ident(item) in wanted else len(wanted))
