"""Java properties text ⇄ :class:`KerutaSettings`: parsing (with `javaproperties`), loading, writing back."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import javaproperties
from javaproperties.util import ascii_splitlines
from pydantic import ValidationError

from keruta_prefect.settings.model import KerutaSettings
from keruta_prefect.settings.values import SettingsError
from keruta_prefect.validation import one_line, shorten


def property_keys() -> dict[str, str]:
    """Property key → field name, for every setting."""
    keys = {}
    for name, info in KerutaSettings.model_fields.items():
        extra = info.json_schema_extra
        assert isinstance(extra, dict)
        keys[str(extra["property"])] = name
    return keys


PROPERTY_KEYS = property_keys()
FIELD_TO_KEY = {field: key for key, field in PROPERTY_KEYS.items()}


def settings_from_mapping(values: Mapping[str, str], *, warn: list[str] | None = None) -> KerutaSettings:
    """Validate property values (key → string). Unknown `keruta.*` keys are reported in ``warn``."""
    fields: dict[str, str] = {}
    unknown = []
    for key, value in values.items():
        if key in PROPERTY_KEYS:
            fields[PROPERTY_KEYS[key]] = value
        elif key.startswith("keruta."):
            unknown.append(key)
    if unknown and warn is not None:
        warn.append(f"unknown keruta settings ignored: {', '.join(sorted(unknown))}")
    try:
        return KerutaSettings.model_validate(fields)
    except ValidationError as exc:
        raise SettingsError(one_line(exc, names=FIELD_TO_KEY)) from None


def parse_properties(data: bytes, *, source: str = "properties") -> dict[str, str]:
    """Parse Java properties text with `javaproperties` (escapes, continuations, \\uXXXX).

    Rejects, in one line naming the line, key and value: bytes that are not UTF-8, a malformed
    ``\\u`` escape, a value that is not text (a lone UTF-16 surrogate escape), and keys set twice.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SettingsError(f"{source}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    result: dict[str, str] = {}
    line = 1  # the first line of the element being parsed
    elements = javaproperties.parse(text)
    while True:
        try:
            element = next(elements, None)
        except javaproperties.InvalidUEscapeError as exc:
            raise SettingsError(_escape_error(text, line, source, exc.escape)) from None
        if element is None:
            return result
        line += len(ascii_splitlines(element.source))
        if not isinstance(element, javaproperties.KeyValue):
            continue
        key, value = element.key, element.value
        if not (_is_text(key) and _is_text(value)):
            name = key if _is_text(key) else shorten(key)
            raise SettingsError(f"{source}: {name}={shorten(value)}: a \\uD800-\\uDFFF escape that is not half "
                                "of a pair; write the character itself")
        if key in result and result[key] != value:
            raise SettingsError(
                f"{source}: {key} is set twice ({shorten(result[key])} and {shorten(value)}); keep one"
            )
        result[key] = value


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escape_error(text: str, line: int, source: str, escape: str) -> str:
    """The line as written (no escapes decoded: that is where the mistake is), cut if long."""
    lines = ascii_splitlines(text)
    raw = lines[line - 1].strip(" \t\f\r\n") if 0 < line <= len(lines) else ""
    if len(raw) > 100:
        raw = raw[:95] + "…" + raw[-4:]
    return f"{source}: line {line}: {raw}: invalid escape {escape} (write \\u and four hex digits, e.g. \\u00e9)"


def load_properties_file(path: str | os.PathLike[str], *, warn: list[str] | None = None) -> KerutaSettings:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read properties file {str(file)!r}: {exc.strerror}") from None
    return settings_from_mapping(parse_properties(data, source=str(file)), warn=warn)


def settings_to_properties(settings: KerutaSettings) -> dict[str, str]:
    """The inverse of parsing: every key with its value as text (lists and maps comma-joined)."""
    out = {}
    for field, key in FIELD_TO_KEY.items():
        value = getattr(settings, field)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = str(value).lower()
        elif field == "tolerations":
            text = json.dumps(value) if value else ""
        elif isinstance(value, list):
            text = ",".join(value)
        elif isinstance(value, dict):
            text = ",".join(f"{k}={v}" for k, v in value.items())
        elif field in _BYTE_FIELDS:
            text = _format_bytes(value)
        else:
            text = str(value)
        out[key] = text
    return out


_BYTE_FIELDS = {"artifacts_max_file_size", "artifacts_max_total_size"}


def _format_bytes(value: int) -> str:
    for suffix, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)
