"""Small pure checks shared by settings, task specs and the manifest builder.

Every check raises ``ValueError`` with a message that names what is allowed; callers add the field
name and the offending value (see :func:`one_line`), so a person always sees field, value and rule.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only named in a signature: the agent checks task ids without loading pydantic
    from pydantic import ValidationError

# Kubernetes quantities: https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/
# (a sign other than "+" is refused here: no quantity keruta takes may be negative)
_QUANTITY = re.compile(r"^\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
                       r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]{1,3}))?$")
BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL_UNITS = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_FRACTIONS = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("0.001"), "": Decimal(1)}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# POSIX-portable environment variable names; Kubernetes itself allows a little more, but a name the
# agent's shell cannot export is useless to a task script.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An image reference as the kubelet parses it (distribution/reference): [registry[:port]/]path[:tag][@digest],
# ASCII only. A registry is DNS-like (no leading/trailing hyphen, no empty label) or a bracketed IPv6
# address; path components are lowercase; a digest is one the kubelet knows, with its exact length.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
IMAGE_REF = re.compile(
    rf"^(?:(?P<registry>{_REGISTRY})/)?"
    rf"(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}))?$",
    re.ASCII,
)
IMAGE_NAME_MAX = 255  # the repository name (registry and path), as distribution/reference limits it
_IMAGE_ID = re.compile(r"^[a-f0-9]{64}$")  # an image id, not a name: the kubelet refuses it as one


def quantity_amount(value: str) -> Decimal:
    """A Kubernetes quantity ("100m", "1.5Gi", "2") as an exact number; ValueError if malformed. The one
    reading of quantities: checks, the summary's shares and the retry policy's scaling all use it."""
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError("expected a Kubernetes quantity such as 500m, 2, 128Mi or 1Gi")
    suffix = match["suffix"] or ""
    unit = BINARY_UNITS.get(suffix) or DECIMAL_UNITS.get(suffix) or _FRACTIONS[suffix]
    exponent = Decimal(10) ** int(match["exp"]) if match["exp"] else Decimal(1)  # 129e6: a decimal exponent
    return Decimal(match["num"]) * unit * exponent


def quantity_suffix(value: str) -> str:
    """The unit suffix of a well-formed quantity ("" for plain numbers)."""
    match = _QUANTITY.match(value.strip())
    return (match["suffix"] or "") if match else ""


def parse_quantity(value: str) -> float:
    """A Kubernetes quantity as a float (see :func:`quantity_amount`); ValueError if malformed."""
    return float(quantity_amount(value))


def check_quantity(value: str, *, allow_zero: bool = False) -> str:
    amount = parse_quantity(value)
    if amount <= 0 and not allow_zero:
        raise ValueError("must be greater than zero")
    return value.strip()


def parse_byte_size(value: Any) -> int:
    """Bytes from an int or a quantity string ("100Mi", "1G", "2048"), a fraction rounded up (as Kubernetes
    rounds a memory quantity: "500m" is 1 byte, never 0); negatives rejected."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes such as 1048576, 100Mi or 1Gi")
    if isinstance(value, int):
        amount: Decimal = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError("must not be negative")
        try:
            amount = quantity_amount(text)
        except ValueError:
            raise ValueError("expected a size in bytes such as 1048576, 100Mi or 1Gi") from None
    else:
        raise ValueError("expected a size in bytes such as 1048576, 100Mi or 1Gi")
    if amount < 0:
        raise ValueError("must not be negative")
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def check_dns_label(value: str) -> str:
    if len(value) > 63 or not DNS1123_LABEL.match(value):
        raise ValueError("must be a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters")
    return value


def check_image(value: str) -> str:
    match = IMAGE_REF.match(value) if value and len(value) <= 512 and not _IMAGE_ID.match(value) else None
    name = f"{match['registry']}/{match['path']}" if match and match["registry"] else match["path"] if match else ""
    if match is None or len(name) > IMAGE_NAME_MAX:
        raise ValueError("must be an image reference such as registry.example.com/keruta-agent:1.0")
    return value


def check_env_name(name: str) -> str:
    if not ENV_NAME.match(name):
        raise ValueError("environment variable names must match [A-Za-z_][A-Za-z0-9_]*")
    return name


def shorten(value: Any, limit: int = 60) -> str:
    """A value as shown in an error line: repr-quoted, control characters escaped, long ones cut."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 5] + "…" + text[-4:]
    return text


def one_line(error: ValidationError, *, names: dict[str, str] | None = None, prefix: str = "") -> str:
    """Turn a pydantic ValidationError into one line per problem: `field=value: what is allowed`.

    ``names`` maps a model field name to the name a person wrote (a property key, a camelCase key).
    """
    parts = []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"]]
        field = ".".join(loc) if loc else "value"
        if names and loc and loc[0] in names:
            field = ".".join([names[loc[0]], *loc[1:]])
        message = _friendly(item)
        if item["type"] == "missing":
            parts.append(f"{prefix}{field}: is required")
        elif item["type"] in ("extra_forbidden",):
            parts.append(f"{prefix}{field}: unknown field")
        else:
            parts.append(f"{prefix}{field}={shorten(item.get('input'))}: {message}")
    return "; ".join(parts)


def _friendly(item: Any) -> str:
    kind = item["type"]
    ctx = item.get("ctx") or {}
    if kind == "bool_parsing" or kind == "bool_type":
        return "expected true or false"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "expected a whole number"
    if kind == "literal_error":
        return f"allowed: {ctx.get('expected', '')}".replace("'", "")
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "value_error":
        return str(ctx.get("error", item["msg"]))
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    return str(item["msg"])


def check_block_name(value: str) -> str:
    """A Prefect block document name (Prefect's own rule: lowercase letters, digits and dashes)."""
    if not re.fullmatch(r"[a-z0-9-]+", value):
        raise ValueError("a Prefect block name: lowercase letters, digits and '-'")
    return value


def exception_line(exc: BaseException) -> str:
    """An exception as one line a person can read: its type and its message's first line (cut to 300)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def single_line(text: str, limit: int = 1000) -> str:
    """``text`` as one line: its non-blank lines joined, cut to ``limit`` characters."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_TASK_ID = 512


def check_task_id(value: str) -> str:
    if not value or len(value) > MAX_TASK_ID or not TASK_ID.match(value):
        raise ValueError(
            f"task ids are 1-{MAX_TASK_ID} characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value
