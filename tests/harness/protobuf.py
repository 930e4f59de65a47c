"""Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), decoded to the
JSON objects the rest of the harness handles.

kubectl's typed clients send protobuf, not JSON: `kubectl create namespace|secret|configmap|serviceaccount`
and `kubectl auth can-i` (a SelfSubjectAccessReview). A server that read those bodies as JSON would see an
empty object (and `auth can-i` would answer "yes" to everything). A real API server decodes them with the
generated code of k8s.io/api; the harness decodes the protobuf wire format itself, with the field numbers
of k8s.io/api's `generated.proto` for the kinds above. Any other kind is refused with 415, naming it.

The envelope (k8s.io/apimachinery/pkg/runtime/serializer/protobuf): the 4 bytes ``k8s\\x00``, then a
``runtime.Unknown`` message: typeMeta = 1 (apiVersion = 1, kind = 2), raw = 2 (the object's own message).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

# A schema maps a field number to (JSON name, type); a type is "string", "bytes", "int", "bool", "time", a nested
# schema (dict), ("repeated", type) or ("map", value type) (a map is a repeated entry message: key = 1, value = 2).
Schema = dict[int, tuple[str, Any]]

TYPE_META: Schema = {1: ("apiVersion", "string"), 2: ("kind", "string")}
UNKNOWN: Schema = {1: ("typeMeta", TYPE_META), 2: ("raw", "bytes"), 3: ("contentEncoding", "string"),
                   4: ("contentType", "string")}
TIME: Schema = {1: ("seconds", "int"), 2: ("nanos", "int")}
OBJECT_META: Schema = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"), 5: ("uid", "string"),
    6: ("resourceVersion", "string"), 7: ("generation", "int"), 8: ("creationTimestamp", "time"),
    11: ("labels", ("map", "string")), 12: ("annotations", ("map", "string")),
    14: ("finalizers", ("repeated", "string")),
}
OBJECT_REFERENCE: Schema = {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string")}
KINDS: dict[str, Schema] = {
    "Namespace": {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", ("repeated", "string"))}),
                  3: ("status", {1: ("phase", "string")})},
    "Secret": {1: ("metadata", OBJECT_META), 2: ("data", ("map", "bytes")), 3: ("type", "string"),
               4: ("stringData", ("map", "string")), 5: ("immutable", "bool")},
    "ConfigMap": {1: ("metadata", OBJECT_META), 2: ("data", ("map", "string")), 3: ("binaryData", ("map", "bytes")),
                  4: ("immutable", "bool")},
    "ServiceAccount": {1: ("metadata", OBJECT_META), 2: ("secrets", ("repeated", OBJECT_REFERENCE)),
                       3: ("imagePullSecrets", ("repeated", {1: ("name", "string")})),
                       4: ("automountServiceAccountToken", "bool")},
    "SelfSubjectAccessReview": {
        1: ("metadata", OBJECT_META),
        2: ("spec", {1: ("resourceAttributes", {1: ("namespace", "string"), 2: ("verb", "string"),
                                                3: ("group", "string"), 4: ("version", "string"),
                                                5: ("resource", "string"), 6: ("subresource", "string"),
                                                7: ("name", "string")}),
                     2: ("nonResourceAttributes", {1: ("path", "string"), 2: ("verb", "string")})}),
    },
}


class Unsupported(ValueError):
    """A body the harness cannot decode (the message says why, for a 415 or 400)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise Unsupported("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one message: an int for varints, bytes for everything else."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            out.append((number, data[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise Unsupported(f"wire type {wire} is not used by Kubernetes' messages")
    return out


def _value(kind: Any, raw: int | bytes) -> Any:
    if kind == "string":
        return bytes(raw).decode() if isinstance(raw, bytes) else str(raw)
    if kind == "bytes":
        return base64.b64encode(raw if isinstance(raw, bytes) else b"").decode()  # as JSON carries []byte
    if kind == "int":
        return raw if isinstance(raw, int) else 0
    if kind == "bool":
        return bool(raw)
    if kind == "time":
        decoded = message(raw if isinstance(raw, bytes) else b"", TIME)
        if not decoded.get("seconds"):
            return None  # the zero metav1.Time, which JSON writes as null
        return datetime.fromtimestamp(decoded.get("seconds", 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(kind, dict):
        return message(raw if isinstance(raw, bytes) else b"", kind)
    raise Unsupported(f"no decoder for {kind!r}")


def message(data: bytes, schema: Schema) -> dict[str, Any]:
    """One message as its JSON object (fields the schema does not name are skipped, as proto3 does)."""
    out: dict[str, Any] = {}
    for number, raw in _fields(data):
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, tuple) and kind[0] == "repeated":
            out.setdefault(name, []).append(_value(kind[1], raw))
        elif isinstance(kind, tuple) and kind[0] == "map":
            entry = message(raw if isinstance(raw, bytes) else b"", {1: ("key", "string"), 2: ("value", kind[1])})
            out.setdefault(name, {})[entry.get("key", "")] = entry.get("value", "")
        else:
            value = _value(kind, raw)
            if value not in ("", 0, None) or kind == "bool":  # gogo writes empty fields; JSON omits them
                out[name] = value
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON object it encodes; Unsupported if it is not one the harness knows."""
    if not body.startswith(MAGIC):
        raise Unsupported("the body does not start with the Kubernetes protobuf envelope")
    unknown = message(body[len(MAGIC):], UNKNOWN)
    type_meta = unknown.get("typeMeta") or {}
    kind = type_meta.get("kind", "")
    if kind not in KINDS:
        raise Unsupported(f"the harness decodes protobuf for {', '.join(sorted(KINDS))}, not {kind or 'this body'}; "
                          "send JSON")
    raw = base64.b64decode(unknown.get("raw", ""))
    return {"apiVersion": type_meta.get("apiVersion", ""), "kind": kind, **message(raw, KINDS[kind])}


# --- encoding (OpenAPI v2 for kubectl < 1.28, which reads it only as gnostic's protobuf) ------------------
def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, value: bytes | str | bool | int) -> bytes:
    """One encoded field: strings and messages (bytes) length-delimited, bools and ints as varints."""
    if isinstance(value, bool | int):
        return _encode_varint(number << 3) + _encode_varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data
