"""The kinds of value a setting takes, as written in `application.properties`, and the error for a bad one."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from keruta_prefect.errors import PermanentError
from keruta_prefect.validation import parse_byte_size


class SettingsError(PermanentError, ValueError):
    """A bad settings file or value; ``str()`` is one line naming the key, the value and the rule."""


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _json_list(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON list, e.g. [{\"key\": \"gpu\", \"operator\": \"Exists\"}]") from None
    return value


def _split_map(value: Any) -> Any:
    if isinstance(value, str):
        result: dict[str, str] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError("expected key=value pairs separated by commas")
            key, _, val = part.partition("=")
            result[key.strip()] = val.strip()
        return result
    return value


def _factor(value: Any) -> Any:
    """``off`` (or empty) stays ``off``; anything else is a number greater than 1 (at most 100)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return "off"
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 1 < number <= 100:  # NaN fails this too
        raise ValueError("expected a factor greater than 1 (at most 100), such as 2 or 1.5, or off")
    return int(number) if number.is_integer() else number


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
# A multiplier a retry applies (more memory, a longer deadline), or "off": no such retry.
Factor = Annotated[int | float | Literal["off"], BeforeValidator(_factor)]
OptionalStr = Annotated[str | None, BeforeValidator(_blank_to_none)]
StrList = Annotated[list[str], BeforeValidator(_split_list)]
StrMap = Annotated[dict[str, str], BeforeValidator(_split_map)]
JsonList = Annotated[list[dict[str, Any]], BeforeValidator(_json_list)]
AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


def setting(prop: str, description: str, default: Any, **kw: Any) -> Any:
    """A field whose property key is recorded in its JSON schema (`property`)."""
    return Field(default, description=f"{description} (`{prop}`)", json_schema_extra={"property": prop}, **kw)


